"""Tokenization helpers of the Tokenize and Detokenize RPCs: each token's own bytes
(byte-level BPE and SentencePiece byte fallback), template variables and an open final
message. Oracles: the text's UTF-8 bytes, and transformers' own rendering."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from salience_server.engine import tokenization
from salience_server.engine.errors import SalienceError
from tests.tiny_models import build_tokenizer

TEXT = "café ☕ 🙂!"


def test_byte_level_tokens_map_back_to_their_bytes() -> None:
    tokenizer = build_tokenizer()  # byte-level, no merges: one token per byte
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = tokenization.token_bytes(tokenizer, ids, len(tokenizer))
    assert pieces == [bytes([b]) for b in TEXT.encode()]
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenization.token_bytes(tokenizer, [special], len(tokenizer)) == [b"<|im_end|>"]
    with pytest.raises(SalienceError):
        tokenization.token_bytes(tokenizer, [len(tokenizer)], len(tokenizer))


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE: ``▁`` word marks, a few letters, and byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["\u2581", "c", "a", "f", "!", "\u2581c", "\u2581ca", "\u2581caf"]:
        vocab[piece] = len(vocab)
    merges = [("\u2581", "c"), ("\u2581c", "a"), ("\u2581ca", "f")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_byte_fallback_pieces_are_their_bytes() -> None:
    tokenizer = _sentencepiece_tokenizer()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = tokenization.token_bytes(tokenizer, ids, len(tokenizer))
    assert b"".join(pieces) == (" " + TEXT).encode()  # Metaspace marks the first word too
    assert pieces[0] == b" caf"
    assert bytes([0xE2]) in pieces  # the first byte of the cup, a token of its own
    assert all(len(p) == 1 for p in pieces if p[0] >= 0x80)


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not loop.last or m['role'] != 'assistant' or add_generation_prompt %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def test_template_variables_and_an_open_final_message_reach_the_template() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]

    def rendered(ids: list[int]) -> str:
        return str(tokenizer.decode(ids))

    plain = tokenization.encode_chat(tokenizer, messages, None, True)
    quiet = tokenization.encode_chat(tokenizer, messages, None, True, {"enable_thinking": False})
    assert rendered(quiet) == rendered(plain) + "<think>\n\n</think>\n\n"
    # Template variables never override the named arguments.
    forced = tokenization.encode_chat(
        tokenizer, messages, None, True, {"add_generation_prompt": False, "tokenize": True}
    )
    assert forced == plain
    reply = [*messages, {"role": "assistant", "content": "Well"}]
    open_reply = tokenization.encode_chat(tokenizer, reply, None, False, None, True)
    assert rendered(open_reply).endswith("<|im_start|>assistant\nWell")
    with pytest.raises(SalienceError) as error:
        tokenization.encode_chat(tokenizer, reply, None, True, None, True)
    assert error.value.reason == "BAD_MESSAGES"
    with pytest.raises(SalienceError) as error:
        tokenization.parse_json_object("[1]", "chat_template_kwargs_json")
    assert error.value.reason == "BAD_JSON"
    for depth in (101, 5000):  # past the recursion limit it was UNKNOWN (RecursionError)
        with pytest.raises(SalienceError) as error:
            tokenization.parse_json_list("[" * depth + "]" * depth, "messages_json")
        assert error.value.reason == "BAD_JSON" and "nested more than 100" in error.value.message
