#!/usr/bin/env bash
# Regenerates the Python stubs (and .pyi type stubs) from proto/ into
# salience_client/pb/ (or into $1). tests/unit/test_proto_drift.py fails when the
# committed stubs differ from what this script produces.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/salience_client/pb}"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$work" --pyi_out="$work" --grpc_python_out="$work" \
  "$root/proto/salience/v1/salience.proto"
mkdir -p "$out"
for f in salience_pb2.py salience_pb2.pyi salience_pb2_grpc.py; do
  # The stubs live in one flat package; make the generated import relative.
  sed 's/^from salience\.v1 import salience_pb2/from . import salience_pb2/' \
    "$work/salience/v1/$f" > "$out/$f"
done
[ -f "$out/__init__.py" ] || echo '"""Generated protobuf and gRPC stubs for salience.v1 (scripts/gen_proto.sh)."""' > "$out/__init__.py"
