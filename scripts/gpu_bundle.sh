#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs on a CUDA machine that has Python 3.12, torch and
# pytest but no network, into .gpu-bundle/ (git-ignored; copy it beside the checkout
# there): wheels of Salience's other dependencies at the versions of this .venv (CPython
# 3.12, manylinux x86-64), and the default model's config and tokenizer (its weights are
# drawn at random there: the check measures speed on the model's shapes, not its text).
#
#   scripts/gpu_bundle.sh        # here, after make setup; about 48 MB
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/wheels" "$bundle/model"
# Salience's dependencies and the test tools, with their own, less those a machine with
# torch has (numpy, pillow, pyyaml, tqdm, filelock, fsspec, packaging, psutil) and the
# hub's download client (nothing is downloaded): under 64 MB in all.
packages=(
  grpcio grpcio-tools grpcio-health-checking grpcio-reflection grpcio-status grpcio-testing
  protobuf googleapis-common-protos gguf accelerate fastapi starlette annotated-doc uvicorn
  click h11 pydantic pydantic-core annotated-types typing-inspection typing-extensions
  openai jiter distro sniffio anyio httpx httpcore llguidance jsonschema
  jsonschema-specifications referencing rpds-py attrs prometheus-client transformers
  huggingface-hub httpx2 httpcore2 truststore kernels tomlkit opentelemetry-api tokenizers safetensors regex hypothesis sortedcontainers pytest
  pytest-timeout pluggy iniconfig
)
pins=()
for name in "${packages[@]}"; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  pins+=("$name==$version")
done
platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
.venv/bin/python -m pip download -q --disable-pip-version-check --no-color --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d "$bundle/wheels" "${pins[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# The check runs the suite in parallel processes (pytest-xdist, not a dependency here).
.venv/bin/python -m pip download -q --disable-pip-version-check --no-color --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d "$bundle/wheels" pytest-xdist execnet \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
.venv/bin/python - "$bundle/model" <<'PY'
import shutil, sys
from pathlib import Path

from salience_server.engine.loader import resolve_model_path

source, _ = resolve_model_path(None)
for path in source.iterdir():
    if path.suffix != ".safetensors":
        shutil.copy(path, Path(sys.argv[1]) / path.name)
PY
du -sh "$bundle"
