#!/usr/bin/env bash
# The demo: set-up, then the quickstart experiment through `flwr run . --stream` on Flower's Ray
# simulation runtime (one virtual SuperNode per user, 1 CPU per ClientApp), then its final test
# HR@K / NDCG@K.
#
#   bash scripts/demo.sh                          # experiments/quickstart.yaml
#   bash scripts/demo.sh experiments/other.yaml   # another experiment
#   FEDREC_DEMO_OVERRIDES="train.rounds=5" bash scripts/demo.sh   # "key=value;key=value"
#
# It starts its own simulation SuperLink (private FLWR_HOME in a temporary folder, free loopback
# ports, runtime dependency installation off) and always stops it, with everything it started
# (SuperExec, flwr-simulation, Ray), by PID when it exits. Results go to
# runs/<name>-<config hash>-flwr/ (config.yaml, metrics.csv, summary.json). Exit status is
# non-zero when the run fails or writes no complete summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

bash scripts/setup.sh

VBIN="$ROOT/.venv/bin"
PY="$VBIN/python"
export PATH="$VBIN:$PATH"   # the SuperLink starts flower-superexec, flwr-serverapp, ... from PATH
EXPERIMENT=${1:-experiments/quickstart.yaml}
OVERRIDES=${FEDREC_DEMO_OVERRIDES:-}
[ -f "$EXPERIMENT" ] || { echo "demo: no such experiment: $EXPERIMENT" >&2; exit 2; }
EXPERIMENT=$(cd "$(dirname "$EXPERIMENT")" && pwd)/$(basename "$EXPERIMENT")

# Everything `flwr run` and the ServerApp need to know, from the resolved experiment: the number
# of users (= SuperNodes; after preprocessing, as the ServerApp counts them) and the run directory.
export FEDREC_PROJECT_ROOT="$ROOT"   # relative output dirs resolve here, not in the FAB's folder
read -r N_USERS RUN_DIR < <(
  "$PY" - "$EXPERIMENT" "$OVERRIDES" <<'EOF'
import sys
from fedrec.build import build_env
from fedrec.client_app import split_overrides
from fedrec.config import load_one
from fedrec.server_app import flwr_run_dir, output_root

cfg = load_one(sys.argv[1], split_overrides(sys.argv[2]))
print(build_env(cfg).data.n_users, flwr_run_dir(cfg, output_root({}, cfg)))
EOF
)
case "${N_USERS:-}" in
  ''|*[!0-9]*) echo "demo: could not read the number of users from $EXPERIMENT" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------------------- SuperLink
FLWR_HOME=$(mktemp -d "${TMPDIR:-/tmp}/fedrec-demo-flwr.XXXXXX")
export FLWR_HOME
read -r HTTP_PORT CONTROL_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
# `flwr run` (connection ":local:", the default) uses the SuperLink on the HTTP port (which also
# serves the Control API in Flower 1.41); it would start one of its own on these ports otherwise
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$HTTP_PORT FLWR_LOCAL_CONTROL_API_PORT=$CONTROL_PORT
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # set before the SuperLink starts
export FLWR_DISABLE_UPDATE_CHECK=1 RAY_DISABLE_USAGE_STATS=1
SL_PID=""
SL_LOG="$FLWR_HOME/superlink.log"

descendants() {  # every descendant of PID $1
  local k
  for k in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$k"
    descendants "$k"
  done
}

members() {  # live processes listed in $1 (" pid pid ... ") or in a session one of those leads
  ps -e -o pid=,sid=,stat= | while read -r pid sid stat; do
    case "$stat" in Z*) continue ;; esac
    case "$1" in *" $pid "*|*" $sid "*) echo "$pid" ;; esac
  done
}

stop_superlink() {  # the SuperLink and all it started (SuperExec, flwr-simulation, Ray), by PID
  [ -n "$SL_PID" ] || return 0
  local ours sig i left
  # collected before anything is re-parented; SuperExec and Ray run in sessions of their own,
  # led by processes in this tree
  ours=" $SL_PID $(descendants "$SL_PID" | tr '\n' ' ') "
  kill -TERM "$SL_PID" 2>/dev/null || true
  for i in $(seq 75); do
    kill -0 "$SL_PID" 2>/dev/null || break
    sleep 0.2
  done
  for sig in TERM KILL; do
    left=$(members "$ours")
    [ -n "$left" ] || break
    kill -"$sig" $left 2>/dev/null || true
    for i in $(seq 25); do
      [ -n "$(members "$ours")" ] || break
      sleep 0.2
    done
  done
  SL_PID=""
}

on_exit() {
  local rc=$?
  stop_superlink
  if [ "$rc" -ne 0 ] && [ -s "$SL_LOG" ]; then
    echo "---- last lines of the SuperLink log ----" >&2
    tail -n 30 "$SL_LOG" >&2
  fi
  rm -rf "$FLWR_HOME"
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setsid "$VBIN/flower-superlink" --insecure --simulation --isolation subprocess \
  --host 127.0.0.1 --port "$HTTP_PORT" \
  --disable-runtime-dependency-installation --log-file "$SL_LOG" >/dev/null 2>&1 &
SL_PID=$!
"$PY" - "$HTTP_PORT" "$SL_PID" <<'EOF'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("demo: flower-superlink exited during start-up")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("demo: flower-superlink did not start within 60 s")
EOF
echo "demo: SuperLink (pid $SL_PID) on 127.0.0.1:$HTTP_PORT; $N_USERS SuperNodes, one per user" >&2

# ---------------------------------------------------------------------------- flwr run
# Flower's round-by-round log goes to $RUN_DIR/flwr.log; the terminal gets one progress line
# (a bar on a terminal, a line per tenth of the run otherwise) and the final table.
touch "$FLWR_HOME/started"
mkdir -p "$RUN_DIR"
FLWR_LOG="$RUN_DIR/flwr.log"
ROUNDS=$("$PY" -c 'import sys; from fedrec.client_app import split_overrides; from fedrec.config import load_one; print(load_one(sys.argv[1], split_overrides(sys.argv[2])).train.rounds)' "$EXPERIMENT" "$OVERRIDES")
RUN_CONFIG="experiment=\"$EXPERIMENT\""
[ -z "$OVERRIDES" ] || RUN_CONFIG="$RUN_CONFIG overrides=\"$OVERRIDES\""
echo "demo: flwr run . --stream ($ROUNDS rounds); Flower's log: ${FLWR_LOG#"$ROOT"/}" >&2
set +e
"$VBIN/flwr" run . --stream \
  --federation-config "num-supernodes=$N_USERS client-resources-num-cpus=1" \
  --run-config "$RUN_CONFIG" 2>&1 | "$PY" -u -c '
import re, sys, time
log, total = open(sys.argv[1], "w"), int(sys.argv[2])
tty, t0, shown, step = sys.stderr.isatty(), time.monotonic(), 0, max(1, total // 10)
for line in sys.stdin:
    log.write(line)
    log.flush()
    m = re.search(r"\[ROUND (\d+)\]", line)
    if not m:
        continue
    r = int(m.group(1)) - 1  # rounds done
    if r == 0:
        t0 = time.monotonic()  # from round 1 on: start-up (Ray, 250 nodes) is not a round
    el = time.monotonic() - t0
    eta = f", about {el / r * (total - r):.0f} s left" if r else ""
    if tty:
        bar = "#" * (30 * r // total)
        print(f"\r  [{bar:<30}] round {r}/{total}{eta}   ", end="", file=sys.stderr, flush=True)
    elif r - shown >= step:
        shown = r
        print(f"  round {r}/{total} ({el:.0f} s{eta})", file=sys.stderr, flush=True)
if tty:
    full = "#" * 30
    print(f"\r  [{full}] {total} rounds in {time.monotonic() - t0:.0f} s" + " " * 20,
          file=sys.stderr)
' "$FLWR_LOG" "$ROUNDS"
FLWR_RC=${PIPESTATUS[0]}
set -e
stop_superlink
if [ "$FLWR_RC" -ne 0 ]; then
  echo "---- last lines of Flower's log ($FLWR_LOG) ----" >&2
  tail -n 20 "$FLWR_LOG" >&2
fi

# ---------------------------------------------------------------------------- results
SUMMARY="$RUN_DIR/summary.json"
if [ ! -f "$SUMMARY" ] || [ ! "$SUMMARY" -nt "$FLWR_HOME/started" ]; then
  echo "demo: FAILED: flwr run exited with $FLWR_RC and wrote no $SUMMARY" >&2
  exit 1
fi
"$PY" - "$SUMMARY" "$ROOT" "$FLWR_RC" <<'EOF'
import json, os, sys
path, root, flwr_rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = json.load(open(path))
final = s.get("final", {})
ks = sorted({int(k.split("@")[1]) for k in final if k.startswith("test_hr@")})
ok = s.get("status") == "complete" and ks and flwr_rc == 0
print()
print(f"== {s['name']} under flwr run ({s.get('supernodes')} SuperNodes, {s['rounds']} rounds, "
      f"seed {s['seed']}): final test metrics ==")
print(f"  {'K':>3}  {'HR@K':>7}  {'NDCG@K':>7}")
for k in ks:
    print(f"  {k:>3}  {final[f'test_hr@{k}']:7.4f}  {final[f'test_ndcg@{k}']:7.4f}")
print(f"  training {s.get('train_seconds')} s; results in {os.path.relpath(os.path.dirname(path), root)}/")
if not ok:
    print(f"demo: FAILED: status {s.get('status')!r}, flwr run exit code {flwr_rc}", file=sys.stderr)
    sys.exit(1)
EOF
