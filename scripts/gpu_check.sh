#!/usr/bin/env bash
# Salience on a CUDA machine, in one run: the test suite with its servers on the GPU
# (float32: the same oracles and tolerances as on CPU), then benchmarks/decode.py,
# step_profile.py, swap.py and concurrency.py on a model of the default model's shapes with
# random weights.
# Where the machine cannot reach PyPI, run scripts/gpu_bundle.sh here first and copy
# .gpu-bundle/ beside the checkout there: where the machine's Python lacks Salience's
# dependencies, the bundle's wheels go to a private directory on PYTHONPATH (nothing is
# installed into that Python).
#
#   scripts/gpu_check.sh OUT_DIR
#
# Knobs (environment): CHECK_DEVICE (cuda), CHECK_TESTS (pytest's arguments: tests),
# CHECK_WORKERS (pytest-xdist processes, one test file each at a time: 8; 0 runs them in
# this process), CHECK_TEST_SECONDS (190), PYTHON (python3). The parts' limits add up
# to 9 minutes; the set-up before them (the wheels, the random model) takes about one. Everything is written under OUT_DIR: machine.txt,
# tests.log and tests.xml (JUnit), decode.txt, profile.txt, swap.txt, concurrency.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
python=${PYTHON:-python3}
device=${CHECK_DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import grpc_health, fastapi, gguf, llguidance" 2>/dev/null; then
  site=$(mktemp -d /tmp/salience-site-XXXXXX)
  "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --target "$site" .gpu-bundle/wheels/*.whl || exit 1
  export PYTHONPATH="$site:$PYTHONPATH"
fi
# Fails fast where a dependency is still missing.
"$python" -c "import salience_server.rpc.server, salience_server.http.app, openai" || exit 1
[ "${CHECK_WORKERS:-8}" -eq 0 ] || "$python" -c "import xdist" || exit 1

{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$python" -c "import sys, torch, transformers, grpc
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| grpcio', grpc.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name())"
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
seconds=${CHECK_TEST_SECONDS:-190}
echo "== tests on $device (at most $seconds s)"
# The session timeout stops pytest starting tests at the limit (it is checked between
# tests), so its summary (each failure's reason) is written unless a test then running
# outlasts the 30 s grace; -v's per-result lines name the failures either way. The hard
# limit then ends the whole process group, workers and their servers (not cluster.sh's
# replicas, which start their own session), before the benchmarks measure.
# shellcheck disable=SC2086
env "${threads[@]}" SALIENCE_TEST_DEVICE="$device" setsid timeout -s KILL $((seconds + 30)) \
  "$python" -m pytest "${parallel[@]}" ${CHECK_TESTS:-tests} -v -rfE --tb=short \
  -p no:cacheprovider --timeout 120 --session-timeout "$seconds" --junitxml "$out/tests.xml" \
  >"$out/tests.log" 2>&1 &
tests=$!
wait $tests
echo "pytest exit status $?"
kill -KILL -- -$tests 2>/dev/null
# -v: each result has its line as it comes, so a run cut short still names its failures.
grep -E "(FAILED|ERROR)|passed|failed" "$out/tests.log" | grep -v "^\[gw[0-9]*\] PASSED" | tail -60

echo "== benchmarks/decode.py on $device"
timeout 90 "$python" -m benchmarks.decode --quick --model "$model" --device "$device" 2>&1 |
  grep -v "Loading weights" | tee "$out/decode.txt"

echo "== benchmarks/step_profile.py on $device: the device's share of a bf16 step"
for batch in 1 8; do
  timeout 45 "$python" -m benchmarks.step_profile --quick --model "$model" --device "$device" \
    --batch "$batch" 2>&1 | grep -v "Loading weights\|USDT"
done | tee "$out/profile.txt"

echo "== benchmarks/swap.py on $device: offloading a bf16 session's KV against recomputing it"
timeout 60 "$python" -m benchmarks.swap --context 4000 --dtype bfloat16 --model "$model" \
  --device "$device" 2>&1 | grep -v "Loading weights" | tee "$out/swap.txt"

echo "== benchmarks/concurrency.py (the server's own device: CUDA where present)"
timeout 120 "$python" -m benchmarks.concurrency --model "$model" 2>&1 | tee "$out/concurrency.txt"
rm -rf "$model"
