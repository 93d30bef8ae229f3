#!/usr/bin/env bash
# A whole deployment on this machine, on loopback: credentials, one data folder per owner, the
# server (Flower SuperLink, TLS, owner authentication) and N data-owner processes, CONFIG run to
# the end into OUT_DIR (the same files as `colora run`). Every process it starts is stopped when it
# exits; the exit code is 0 only when the run finished. docs/deploy.md does the same by hand on
# separate machines.
#
#   examples/deploy/local.sh CONFIG OUT_DIR [--clients N] [--set KEY=VALUE ...]
#
# Credentials, data folders and every process's log go to OUT_DIR.local/. COLORA (default: the
# colora beside this repository's .venv, else the one on PATH) picks the colora command.
set -euo pipefail

usage() { echo "usage: $0 CONFIG OUT_DIR [--clients N] [--set KEY=VALUE ...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
CONFIG=$1 OUT=$2
shift 2
CLIENTS=3
SETS=()
while [ $# -gt 0 ]; do
  case $1 in
    --clients) [ $# -ge 2 ] || usage; CLIENTS=$2; shift 2 ;;
    --set) [ $# -ge 2 ] || usage; SETS+=(--set "$2"); shift 2 ;;
    *) usage ;;
  esac
done
[ -f "$CONFIG" ] || { echo "colora: error: $CONFIG: no such config file" >&2; exit 2; }
[ -e "$OUT" ] && { echo "colora: error: $OUT exists; give a new run directory" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${COLORA:-}" ]; then
  if [ -x "$HERE/.venv/bin/colora" ]; then COLORA=$HERE/.venv/bin/colora; else COLORA=colora; fi
fi
PYTHON=$(dirname "$(command -v "$COLORA")")/python
WORK=$OUT.local
mkdir -p "$WORK"
SETS+=(--set "clients.num=$CLIENTS")
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

PIDS=()
stop_all() {
  # each process leads its own session (setsid): stop it with its SuperLink / SuperNode children
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

wait_for() {  # wait_for LOG PATTERN PID: until LOG shows PATTERN; fail if PID exits first
  local deadline=$((SECONDS + 600))
  until grep -q "$2" "$1" 2>/dev/null; do
    kill -0 "$3" 2>/dev/null || { echo "colora: error: a process stopped early; see $1:" >&2; tail -n 5 "$1" >&2; exit 2; }
    [ $SECONDS -lt $deadline ] || { echo "colora: error: no '$2' in $1 after 600 s" >&2; exit 2; }
    sleep 0.5
  done
}

"$COLORA" deploy keys "$WORK/pki" --clients "$CLIENTS" --host 127.0.0.1
"$COLORA" deploy split-data "$CONFIG" "$WORK/data" "${SETS[@]}"
KEYS=()
for ((k = 0; k < CLIENTS; k++)); do KEYS+=("$WORK/pki/client_$k.pub"); done

setsid "$COLORA" deploy server "$CONFIG" --out "$OUT" --credentials "$WORK/pki" --owner-keys "${KEYS[@]}" \
  --data "$WORK/data/server" --host 127.0.0.1 --port "$PORT" "${SETS[@]}" > "$WORK/server.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
wait_for "$WORK/server.log" "waiting for them to join" "$SERVER"
echo "server on 127.0.0.1:$PORT (log: $WORK/server.log)"

# One owner at a time: owners loading their models at once can starve a small machine's SuperLink.
for ((k = 0; k < CLIENTS; k++)); do
  setsid "$COLORA" deploy client "$CONFIG" --data "$WORK/data/client_$k" --server "127.0.0.1:$PORT" \
    --ca "$WORK/pki/ca.crt" --key "$WORK/pki/client_$k" "${SETS[@]}" > "$WORK/owner$k.log" 2>&1 &
  PIDS+=("$!")
  wait_for "$WORK/owner$k.log" "colora: connected" "$!"
  echo "data owner $k connected (log: $WORK/owner$k.log)"
done

tail -n +1 -f "$WORK/server.log" --pid "$SERVER" | grep --line-buffered -E "^round |colora: " || true
set +e
wait "$SERVER"
RC=$?
set -e
if [ $RC -ne 0 ]; then
  echo "colora: error: the deployed run did not finish (exit code $RC); see $WORK/server.log" >&2
  exit $RC
fi
echo "run directory: $OUT"
