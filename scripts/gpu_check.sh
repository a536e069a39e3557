#!/usr/bin/env bash
# Salience on a CUDA machine, in one run: the test suite with its servers on the GPU
# (float32: the same oracles and tolerances as on CPU), then flash-attn against SDPA in
# bf16 (scripts/flash_check.py), benchmarks/decode.py, step_profile.py, swap.py and
# concurrency.py on a model of the default model's shapes with random weights.
# Where the machine cannot reach PyPI, run scripts/gpu_bundle.sh here first and copy
# .gpu-bundle/ beside the checkout there: where the machine's Python lacks Salience's
# dependencies, the bundle's wheels go to a private directory on PYTHONPATH (nothing is
# installed into that Python).
#
#   scripts/gpu_check.sh OUT_DIR
#
# Knobs (environment): CHECK_DEVICE (cuda), CHECK_TESTS (pytest's arguments: the test
# files that exercise the device most first, then the rest of tests/),
# CHECK_WORKERS (pytest-xdist processes, one test file each at a time: 8; 0 runs them in
# this process), CHECK_TEST_SECONDS (150), PYTHON (python3). The parts' limits add up
# to 8 minutes 15 s; the set-up before them (the wheels, the random model) takes about
# one. Everything is written under OUT_DIR: machine.txt, tests.log and tests.xml (JUnit),
# flash.txt, decode.txt, profile.txt, swap.txt, concurrency.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
python=${PYTHON:-python3}
device=${CHECK_DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__)" ||
  { echo "gpu_check: $python has no torch"; exit 1; }
# What the bundle brings (installed into a private directory where any is missing), then
# what it leaves to the machine's Python (torch's own dependencies).
bundled="grpc grpc_tools grpc_health grpc_reflection grpc_status grpc_testing google.protobuf
  gguf accelerate fastapi starlette uvicorn pydantic openai httpx llguidance jsonschema regex
  prometheus_client
  transformers tokenizers safetensors hypothesis pytest pytest_timeout xdist"
assumed="numpy PIL yaml tqdm packaging psutil filelock fsspec"
missing() { "$python" -c "import importlib.util, sys
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a dotted name whose parent is missing
        return False
print(' '.join(name for name in sys.argv[1:] if not found(name)))" $1; }
if [ -n "$(missing "$bundled")" ]; then
  [ -d .gpu-bundle/wheels ] || { echo "gpu_check: missing $(missing "$bundled"), and no .gpu-bundle/wheels"; exit 1; }
  site=$(mktemp -d /tmp/salience-site-XXXXXX)
  "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --target "$site" .gpu-bundle/wheels/*.whl ||
    { echo "gpu_check: the bundle's wheels (CPython 3.12, x86-64) do not install here"; exit 1; }
  export PYTHONPATH="$site:$PYTHONPATH"
fi
left=$(missing "$bundled $assumed")
[ -z "$left" ] || { echo "gpu_check: this Python lacks $left"; exit 1; }
"$python" -c "import salience_server.rpc.server, salience_server.http.app" || exit 1

{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$python" -c "import sys, torch, transformers, grpc
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| grpcio', grpc.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name())
try:
    import flash_attn
    print('flash-attn', flash_attn.__version__)
except ImportError:
    print('flash-attn not installed: attention is torch SDPA')"
} 2>&1 | tee "$out/machine.txt"

# The default model's shapes with random weights (its GGUF is too large to carry).
model=$(mktemp -d /tmp/salience-shapes-XXXXXX)
shapes=${CHECK_SHAPES:-.gpu-bundle/model}
"$python" - "$shapes" "$model" <<'PY' || exit 1
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
model.save_pretrained(target)
for path in source.iterdir():  # the tokenizer and chat template; the config was saved
    if not path.name.endswith("config.json") or path.name == "tokenizer_config.json":
        shutil.copy(path, target / path.name)
print(f"random weights of {source}'s shapes in {target}")
PY

workers=${CHECK_WORKERS:-8}
parallel=()
# Each worker's own CPU work (the oracles' reference passes) on a share of the cores.
threads=()
[ "$workers" -gt 0 ] && parallel=(-n "$workers" --dist loadfile) && threads=(OMP_NUM_THREADS=2)
seconds=${CHECK_TEST_SECONDS:-150}
# The files that exercise the device most first (pytest-xdist hands files out in order,
# and the limit may cut the rest); pytest skips the second mention of each.
first="tests/unit/test_attention_backends.py tests/unit/test_kv_moves.py
  tests/integration/test_pool_fitting.py tests/integration/test_equivalence.py
  tests/integration/test_bfloat16.py tests/integration/test_scheduling.py
  tests/integration/test_speculative.py tests/integration/test_isolation.py
  tests/integration/test_vision.py tests/integration/test_eviction.py"
echo "== tests on $device (at most $seconds s)"
# The session timeout stops pytest starting tests at the limit (it is checked between
# tests), so its summary (each failure's reason) is written unless a test then running
# outlasts the 30 s grace; -v's per-result lines name the failures either way. The hard
# limit then ends the whole process group, workers and their servers (not cluster.sh's
# replicas, which start their own session), before the benchmarks measure.
# shellcheck disable=SC2086
env "${threads[@]}" SALIENCE_TEST_DEVICE="$device" setsid timeout -s KILL $((seconds + 30)) \
  "$python" -m pytest "${parallel[@]}" ${CHECK_TESTS:-$first tests} -v -rfE --tb=short \
  -p no:cacheprovider --timeout 120 --session-timeout "$seconds" --junitxml "$out/tests.xml" \
  >"$out/tests.log" 2>&1 &
tests=$!
wait $tests
echo "pytest exit status $?"
kill -KILL -- -$tests 2>/dev/null
# -v: each result has its line as it comes, so a run cut short still names its failures.
grep -E "(FAILED|ERROR)|passed|failed" "$out/tests.log" | grep -v "^\[gw[0-9]*\] PASSED" | tail -60

echo "== flash-attn against SDPA, bf16, on $device"
timeout 60 "$python" scripts/flash_check.py "$model" "$device" 2>&1 |
  grep -v "Loading weights" | tee "$out/flash.txt"

echo "== benchmarks/decode.py on $device"
timeout 60 "$python" -m benchmarks.decode --quick --model "$model" --device "$device" 2>&1 |
  grep -v "Loading weights" | tee "$out/decode.txt"

echo "== benchmarks/step_profile.py on $device: the device's share of a bf16 step"
for batch in 1 8; do
  timeout 30 "$python" -m benchmarks.step_profile --quick --model "$model" --device "$device" \
    --batch "$batch" 2>&1 | grep -v "Loading weights\|USDT"
done | tee "$out/profile.txt"

echo "== benchmarks/swap.py on $device: offloading a bf16 session's KV against recomputing it"
timeout 45 "$python" -m benchmarks.swap --context 4000 --dtype bfloat16 --model "$model" \
  --device "$device" 2>&1 | grep -v "Loading weights" | tee "$out/swap.txt"

echo "== benchmarks/concurrency.py (the server's own device: CUDA where present)"
timeout 90 "$python" -m benchmarks.concurrency --model "$model" 2>&1 | tee "$out/concurrency.txt"
rm -rf "$model"
