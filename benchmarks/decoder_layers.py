"""Question: what does the lean decoder-layer forward (``engine/decoder_layers.py``) save
per decode step, against transformers' own layers?

Baseline: the same engine with transformers' layer forward put back (the layers'
modules, norms, wrappers and lookups). Measured: the engine stepped in this process (as
``benchmarks/decode.py`` does), one and eight sessions decoding after a 103-token
prompt, float32 and bfloat16, the two forwards alternating run by run so that both see
the same machine. Prints the best run's ms per step of each and the ratio lean ÷
transformers.

    .venv/bin/python -m benchmarks.decoder_layers [--quick] [--model DIR] [--device cpu]
"""

from __future__ import annotations

import types

from benchmarks import _cli
from benchmarks.decode import EngineDecoder, Where
from salience_server.engine import decoder_layers


def main() -> None:
    parsing = _cli.parser(__doc__)
    parsing.add_argument("--model", default=None, help="a model directory or GGUF file")
    parsing.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = parsing.parse_args()
    runs, steps = (2, 4) if args.quick else (6, 24)
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 8):
            decoder = EngineDecoder(dtype, batch, where=Where(args.model, args.device))
            layers = list(decoder.engine.runner.model.model.layers)
            if not all("forward" in layer.__dict__ for layer in layers):
                print(f"{dtype} batch {batch}: these layers are not streamlined")
                return
            theirs, ours = [], []
            for _ in range(runs):
                for layer in layers:
                    del layer.forward  # transformers' own
                theirs.append(decoder.run(steps))
                for layer in layers:
                    layer.forward = types.MethodType(decoder_layers.forward, layer)
                ours.append(decoder.run(steps))
            print(
                f"{dtype:>8} batch {batch}: lean {min(ours):6.2f} ms/step, transformers' layers "
                f"{min(theirs):6.2f} ms/step, lean/transformers {min(ours) / min(theirs):.3f}"
            )


if __name__ == "__main__":
    main()
