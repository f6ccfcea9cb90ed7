#!/usr/bin/env bash
# sessiond vs Redis on this machine, in the same run: the same session-shaped workload
# (sessiond-bench) against both, alternating A B A B, each server started fresh for each run
# on loopback ports, and the ratio sessiond/Redis of the medians printed per metric.
#
#   bash benches/compare.sh                  # default mix, fsync everysec on both sides
#   MODE=durability bash benches/compare.sh  # write-only mix under no / everysec / always
#
# Environment: ROUNDS (3), DURATION (10s), WARMUP (2s), SESSIONS (100000),
# CONCURRENCY (50), CONNECTIONS (4), FSYNC (everysec; MODE=mix only),
# REDIS_UPDATE (blob or hset), MIX (overrides the mode's mix), PIPELINE (1: sessiond-bench
# sends sessiond's operations over Pipeline streams; Redis's multiplexed connections always
# pipeline concurrent commands), RATE (open loop: offer this many ops/s to both servers and
# compare latency at that load, e.g. half of sessiond's measured throughput), BIN (a directory
# holding prebuilt sessiond and sessiond-bench binaries: skips the build, e.g. to measure an
# older build against Redis in the same way).
# Everything it starts listens on 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${MODE:-mix}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
SESSIONS=${SESSIONS:-100000}
CONCURRENCY=${CONCURRENCY:-50}
CONNECTIONS=${CONNECTIONS:-4}
REDIS_UPDATE=${REDIS_UPDATE:-blob}
PIPELINE_FLAG=(); [ "${PIPELINE:-0}" = "1" ] && PIPELINE_FLAG=(--pipeline)
RATE_FLAG=(); [ -n "${RATE:-}" ] && RATE_FLAG=(--rate "$RATE")

if ! command -v redis-server >/dev/null 2>&1; then
  echo "compare.sh: installing redis-server from Debian's packages" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin sessiond --bin sessiond-bench >&2
  BIN=target/release
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

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
  echo "compare.sh: nothing listens on port $1; server output:" >&2
  cat "$WORK"/*.log >&2 || true
  return 1
}

stop_last() { kill "${PIDS[-1]}" 2>/dev/null || true; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }

# run_sessiond FSYNC MIX OUT
run_sessiond() {
  local gp ap dir
  read -r gp ap < <(free_ports 2); dir="$WORK/sd-$RANDOM"
  "$BIN/sessiond" --listen "127.0.0.1:$gp" --admin-listen "127.0.0.1:$ap" \
    --data-dir "$dir" --fsync "$1" >"$WORK/sessiond.log" 2>&1 &
  PIDS+=($!)
  wait_port "$gp"
  "$BIN/sessiond-bench" --target "grpc://127.0.0.1:$gp" --admin-addr "127.0.0.1:$ap" \
    --sessions "$SESSIONS" --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
    --duration "$DURATION" --warmup "$WARMUP" --mix "$2" "${PIPELINE_FLAG[@]}" "${RATE_FLAG[@]}" --json >"$3"
  stop_last
}

# run_redis APPENDFSYNC MIX OUT
run_redis() {
  local rp dir
  rp=$(free_ports 1); dir="$WORK/redis-$RANDOM"; mkdir -p "$dir"
  if [ "$1" = "off" ]; then aof=(--appendonly no); else aof=(--appendonly yes --appendfsync "$1"); fi
  redis-server --port "$rp" --bind 127.0.0.1 --dir "$dir" --save '' "${aof[@]}" \
    --daemonize no --protected-mode yes >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$rp"
  "$BIN/sessiond-bench" --target "redis://127.0.0.1:$rp" --redis-update "$REDIS_UPDATE" \
    --sessions "$SESSIONS" --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
    --duration "$DURATION" --warmup "$WARMUP" --mix "$2" "${RATE_FLAG[@]}" --json >"$3"
  stop_last
}

# compare LABEL SESSIOND_FSYNC REDIS_FSYNC MIX
compare() {
  local label=$1 out="$WORK/$1"
  mkdir -p "$out"
  for r in $(seq 1 "$ROUNDS"); do
    echo "[$label] round $r/$ROUNDS: sessiond" >&2
    run_sessiond "$2" "$4" "$out/a$r.json"
    echo "[$label] round $r/$ROUNDS: redis" >&2
    run_redis "$3" "$4" "$out/b$r.json"
  done
  python3 - "$label" "$out" "$ROUNDS" <<'PY'
import json, statistics, sys
label, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
load = lambda p: [json.load(open(f"{out}/{p}{r}.json")) for r in range(1, rounds + 1)]
a, b = load("a"), load("b")
med = lambda runs, f: statistics.median(f(x) for x in runs)
rows = [
    ("ops/s (all operations)", lambda x: x["overall"]["ops_per_second"]),
    ("p50 latency (us)", lambda x: x["overall"]["p50_us"]),
    ("p99 latency (us)", lambda x: x["overall"]["p99_us"]),
    ("p99.9 latency (us)", lambda x: x["overall"]["p999_us"]),
    ("server CPU (cores busy)", lambda x: (x["server"] or {}).get("cpu_per_second", float("nan"))),
    ("memory per session (bytes)", lambda x: (x["memory_after_populate"] or {}).get("bytes_per_session", float("nan"))),
]
ops = sorted(set(a[0]["operations"]) & set(b[0]["operations"]))
rows += [(f"  {op} ops/s", (lambda op: lambda x: x["operations"][op]["ops_per_second"])(op)) for op in ops]
print(f"\n== {label}: medians of {rounds} alternating rounds ==")
print(f"{'metric':<30} {'sessiond':>12} {'redis':>12} {'sessiond/redis':>15}")
for name, f in rows:
    x, y = med(a, f), med(b, f)
    ratio = x / y if y else float("nan")
    print(f"{name:<30} {x:>12.0f} {y:>12.0f} {ratio:>15.2f}")
errs = [sum(r["errors"].values()) for r in a], [sum(r["errors"].values()) for r in b]
print(f"{'errors per run':<30} {str(errs[0]):>12} {str(errs[1]):>12}")
PY
}

echo "compare.sh: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)," \
  "sessions=$SESSIONS concurrency=$CONCURRENCY connections=$CONNECTIONS duration=$DURATION rounds=$ROUNDS"
case "$MODE" in
  mix)
    FSYNC=${FSYNC:-everysec}
    MIX=${MIX:-get=80,update=12,create=4,destroy=2,regenerate=1,list=1}
    compare "mix-fsync-$FSYNC${PIPELINE_FLAG[*]:+-pipelined}${RATE:+-at-$RATE-ops}" "$FSYNC" "$FSYNC" "$MIX"
    ;;
  durability)
    MIX=${MIX:-update=80,create=10,destroy=10}
    for policy in no everysec always; do
      compare "writes-fsync-$policy${PIPELINE_FLAG[*]:+-pipelined}" "$policy" "$policy" "$MIX"
    done
    ;;
  *) echo "compare.sh: MODE is mix or durability" >&2; exit 2 ;;
esac
