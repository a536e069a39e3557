"""Question: where does a decode step's time go: the device's own work, or the host
launching it and running the engine around it?

Baseline: the step's wall time, unprofiled. Measured: the engine stepped in this process
(as ``benchmarks/decode.py`` does), ``--batch`` sessions decoding together after a
103-token prompt, under ``torch.profiler``: per step, the operators' own time on the
device (CUDA kernels; on a CPU, the operators' own CPU time, which is the device's work
there) and the operators it goes to. Prints that busy time as a share of the step:
near 1, the step is bound by the device's work (weights, attention); far below on a GPU,
by the host (launches, Python), where capturing the step as a CUDA graph is the lever.

    .venv/bin/python -m benchmarks.step_profile [--quick] [--model DIR] [--device cuda]
        [--dtype bfloat16] [--batch 1]
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import _cli
from benchmarks.decode import EngineDecoder, Where
from salience_server.engine.loader import resolve_device

TOP_OPERATORS = 12


def main() -> None:
    parsing = _cli.parser(__doc__)
    parsing.add_argument("--model", default=None, help="a model directory or GGUF file")
    parsing.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parsing.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    parsing.add_argument("--batch", type=int, default=1, help="sessions decoding together")
    args = parsing.parse_args()
    device = resolve_device(args.device)
    steps = 4 if args.quick else 16
    decoder = EngineDecoder(args.dtype, args.batch, where=Where(args.model, args.device))
    wall_ms = min(decoder.run(steps) for _ in range(2 if args.quick else 4))
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiled:
        decoder.run(steps)
    operators = profiled.key_averages()

    def own_us(event: object) -> float:
        name = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        return float(getattr(event, name))

    busy_ms = sum(own_us(event) for event in operators) / 1e3 / steps
    where = "kernels on the GPU" if on_gpu else "operators on the CPU"
    print(
        f"{args.dtype}, {args.batch} session(s) on {device}: a step takes {wall_ms:.2f} ms; "
        f"its {where} take {busy_ms:.2f} ms of it: {busy_ms / wall_ms:.2f}x the step"
    )
    print(f"the {TOP_OPERATORS} operators taking most of that, per step:")
    for event in sorted(operators, key=own_us, reverse=True)[:TOP_OPERATORS]:
        count = event.count / steps
        print(f"  {own_us(event) / 1e3 / steps:7.3f} ms  {count:6.1f} calls  {event.key[:70]}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
