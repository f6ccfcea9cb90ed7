#!/usr/bin/env bash
# The whole web stack side by side: the storefront's session routes (cart read, cart add,
# login) served by the same handlers on SessiondLayer + sessiond and on tower-sessions +
# tower-sessions-redis-store + Redis (benches/web), driven by the same HTTP load of virtual
# browsers that each keep their own cookie (web-load). Alternating rounds A B A B, each stack
# started fresh per round on loopback ports; medians per metric and the ratios
# sessiond-stack / redis-stack, then the lost-adds check of every run (concurrent tabs of one
# browser adding distinct items: acknowledged adds the final cart does not hold).
#
#   bash benches/web-compare.sh
#   ROUNDS=1 DURATION=2s WARMUP=1s bash benches/web-compare.sh   # a smoke run
#
# Environment: ROUNDS (3), DURATION (10s), WARMUP (2s), BROWSERS (64: concurrent virtual
# browsers, one connection and one request in flight each), MIX (read=70,add=25,login=5),
# SKUS (20), TAB_BROWSERS (20), TABS (8), ADDS_PER_TAB (5): the lost-adds check,
# FSYNC (everysec: sessiond's --fsync and Redis's appendfsync), REDIS_POOL (4: tower-sessions'
# Redis connections), RUN_TIMEOUT (300s: the most one load run may take), BIN (a directory
# holding prebuilt sessiond, web-app and web-load binaries: skips the build).
# Everything it starts listens on 127.0.0.1 on free ports, and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
BROWSERS=${BROWSERS:-64}
MIX=${MIX:-read=70,add=25,login=5}
SKUS=${SKUS:-20}
TAB_BROWSERS=${TAB_BROWSERS:-20}
TABS=${TABS:-8}
ADDS_PER_TAB=${ADDS_PER_TAB:-5}
FSYNC=${FSYNC:-everysec}
REDIS_POOL=${REDIS_POOL:-4}
RUN_TIMEOUT=${RUN_TIMEOUT:-300s}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "web-compare.sh: installing redis-server from Debian's packages" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin sessiond >&2
  # Its own workspace (benches/web/Cargo.lock), built into the root's target directory.
  cargo build --release --locked --manifest-path benches/web/Cargo.toml --target-dir target >&2
  BIN=target/release
fi
for b in sessiond web-app web-load; do
  [ -x "$BIN/$b" ] || { echo "web-compare.sh: no $b in $BIN" >&2; exit 2; }
done
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do if [ -n "$p" ]; then kill -KILL "$p" 2>/dev/null || true; fi; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# N distinct free loopback ports (all held open while choosing, so none repeats).
free_ports() {
  python3 -c 'import socket,sys
socks=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

wait_port() {
  for _ in $(seq 1 200); do
    python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$1)))" && return 0
    sleep 0.05
  done
  echo "web-compare.sh: nothing listens on port $1; output:" >&2
  cat "$WORK"/*.log >&2 || true
  return 1
}

# Stops every process of the run (SIGTERM; SIGKILL after 10 s) and deletes the data in DIR.
stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
  rm -rf "$1"
}

# load APP_PORT OUT: one web-load run against the app; CPU of the app and the store (PIDS).
load() {
  local pids
  pids=$(IFS=,; echo "${PIDS[*]}")
  timeout --kill-after=10s "$RUN_TIMEOUT" "$BIN/web-load" --target "127.0.0.1:$1" \
    --browsers "$BROWSERS" --duration "$DURATION" --warmup "$WARMUP" --mix "$MIX" --skus "$SKUS" \
    --tab-browsers "$TAB_BROWSERS" --tabs "$TABS" --adds-per-tab "$ADDS_PER_TAB" \
    --pids "$pids" --json >"$2"
}

# run_sessiond OUT: sessiond, then the app on SessiondLayer; PIDS = app, store.
run_sessiond() {
  local gp ap hp dir
  read -r gp ap hp < <(free_ports 3); dir="$WORK/sd-$RANDOM"
  "$BIN/sessiond" --listen "127.0.0.1:$gp" --admin-listen "127.0.0.1:$ap" \
    --data-dir "$dir" --fsync "$FSYNC" >"$WORK/sessiond.log" 2>&1 &
  local store=$!
  PIDS+=("$store")
  wait_port "$gp"
  "$BIN/web-app" --store sessiond --sessiond "http://127.0.0.1:$gp" --listen "127.0.0.1:$hp" \
    >"$WORK/web-app.log" 2>&1 &
  PIDS=($! "$store")
  wait_port "$hp"
  load "$hp" "$1"
  stop_all "$dir"
}

# run_redis OUT: Redis under appendfsync FSYNC, then the app on tower-sessions; PIDS = app,
# store.
run_redis() {
  local rp hp dir
  read -r rp hp < <(free_ports 2); dir="$WORK/redis-$RANDOM"; mkdir -p "$dir"
  redis-server --port "$rp" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly yes \
    --appendfsync "$FSYNC" --daemonize no --protected-mode yes >"$WORK/redis.log" 2>&1 &
  local store=$!
  PIDS+=("$store")
  wait_port "$rp"
  "$BIN/web-app" --store redis --redis "redis://127.0.0.1:$rp" --redis-pool "$REDIS_POOL" \
    --listen "127.0.0.1:$hp" >"$WORK/web-app.log" 2>&1 &
  PIDS=($! "$store")
  wait_port "$hp"
  load "$hp" "$1"
  stop_all "$dir"
}

echo "web-compare.sh: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)," \
  "browsers=$BROWSERS mix=$MIX duration=$DURATION rounds=$ROUNDS fsync=$FSYNC"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS: sessiond stack" >&2
  run_sessiond "$WORK/sessiond-$r.json"
  echo "round $r/$ROUNDS: tower-sessions + Redis stack" >&2
  run_redis "$WORK/redis-$r.json"
done

python3 - "$WORK" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
stacks = ["sessiond", "redis"]
runs = {s: [json.load(open(f"{out}/{s}-{r}.json")) for r in range(1, rounds + 1)] for s in stacks}
nan = float("nan")
cpu = lambda i: lambda x: (x.get("processes") or {}).get("per_process", [nan, nan])[i]
rows = [
    ("requests/s", lambda x: x["overall"]["ops_per_second"]),
    ("p50 latency (us)", lambda x: x["overall"]["p50_us"]),
    ("p99 latency (us)", lambda x: x["overall"]["p99_us"]),
    ("p99.9 latency (us)", lambda x: x["overall"]["p999_us"]),
    ("app + store CPU (cores)", lambda x: (x.get("processes") or {}).get("cpu_per_second", nan)),
    ("  app CPU (cores)", cpu(0)),
    ("  store CPU (cores)", cpu(1)),
]
for op in ("read", "add", "login"):
    rows.append((f"  {op} requests/s", (lambda op: lambda x: x["operations"][op]["ops_per_second"])(op)))
    rows.append((f"  {op} p99 (us)", (lambda op: lambda x: x["operations"][op]["p99_us"])(op)))
med = {(n, s): statistics.median(f(x) for x in runs[s]) for n, f in rows for s in stacks}
fmt = lambda x: f"{x:.2f}" if abs(x) < 10 else f"{x:.0f}"
print(f"\n== medians of {rounds} rounds (sessiond stack, then tower-sessions + Redis, in turn) ==")
print(f"{'metric':<28}{'sessiond':>12}{'redis':>12}{'ratio':>9}")
for n, _ in rows:
    a, b = med[(n, "sessiond")], med[(n, "redis")]
    ratio = a / b if b else nan
    print(f"{n:<28}{fmt(a):>12}{fmt(b):>12}{ratio:>9.2f}")
errs = {s: [sum(x["errors"].values()) for x in runs[s]] for s in stacks}
print(f"{'error answers per run':<28}{str(errs['sessiond']):>12}{str(errs['redis']):>12}")
print("\nratio: sessiond stack / redis stack (requests/s: above 1 is better; latency, CPU: below 1)")
print("\nlost cart adds (concurrent tabs of one browser, distinct items), per run:")
for s in stacks:
    cells = []
    for x in runs[s]:
        l = x.get("lost_adds") or {}
        cells.append(f"{l.get('lost', '-')} of {l.get('acknowledged', '-')} lost"
                     + (f" ({l['failed']} failed)" if l.get("failed") else ""))
    print(f"  {s:<10}{'; '.join(cells)}")
PY
