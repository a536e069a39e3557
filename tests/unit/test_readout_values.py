"""A token's readout, read by layer and concept name."""

from __future__ import annotations

import pytest

from salience_client import ReadoutValues


def test_a_readout_is_read_by_layer_and_concept_and_unknown_ones_are_key_errors() -> None:
    """``readout[layer, concept]``, as a mapping: a layer or concept not read out is a
    KeyError naming those that were (list.index's ValueError said only "not in list")."""
    readout = ReadoutValues(layers=[3, 7], concepts=["joy", "fear"], values=[[1, 2], [3, 4]])
    assert readout[7, "joy"] == 3 and readout[3, "fear"] == 2
    assert readout.as_dict() == {3: {"joy": 1, "fear": 2}, 7: {"joy": 3, "fear": 4}}
    with pytest.raises(KeyError, match=r"layer 5 was not read out; the layers are \[3, 7\]"):
        readout[5, "joy"]
    with pytest.raises(KeyError, match="no concept 'anger'; the concepts are"):
        readout[3, "anger"]
