#!/usr/bin/env bash
# sessiond vs Redis on this machine, in the same run: the same session-shaped workload
# (sessiond-bench) against both, alternating A B A B, each server started fresh for each run
# on loopback ports, and the ratio sessiond/Redis of the medians printed per metric.
#
#   bash benches/compare.sh                  # default mix, fsync everysec on both sides
#   MODE=durability bash benches/compare.sh  # write-only mix under no / everysec / always
#   PIPELINE=1 CLUSTER=3 bash benches/compare.sh
#       # replicated: also a 3-node sessiond group (load on its leader) and Redis with one
#       # replica (async replication, both with the AOF), each round running single-node
#       # sessiond, the group, Redis and Redis + replica in turn
#
# Environment: ROUNDS (3), DURATION (10s), WARMUP (2s), SESSIONS (100000),
# CONCURRENCY (50), CONNECTIONS (4), FSYNC (everysec; MODE=mix only),
# REDIS_UPDATE (blob or hset), MIX (overrides the mode's mix), PIPELINE (1: sessiond-bench
# sends sessiond's operations over Pipeline streams; Redis's multiplexed connections always
# pipeline concurrent commands), RATE (open loop: offer this many ops/s to both servers and
# compare latency at that load, e.g. half of sessiond's measured throughput), BIN (a directory
# holding prebuilt sessiond and sessiond-bench binaries, and sessionctl for CLUSTER: skips the
# build, e.g. to measure an older build against Redis in the same way), CLUSTER (N >= 2
# nodes: add the replicated group and Redis + replica to every round), VIA_FOLLOWER (1, with
# CLUSTER: also a run with the load on a follower, which forwards everything to the leader),
# CLUSTER_TOML (lines added to each node's [cluster] section, e.g.
# 'max_entries_per_append = 1000'), RUN_TIMEOUT (600s: the most one run may take), ONLY (the
# servers to run, of sessiond,cluster,via-follower,redis,redis+replica; e.g. to profile one),
# PIN (1: a diagnostic run with every server pinned to CPU 0 and the load generator to CPU 1,
# so neither is charged for the other's work; sessiond then runs one worker thread),
# LOAD_THREADS (sessiond-bench's worker threads; unset: its default, one per CPU less one).
# Everything it starts listens on 127.0.0.1 on free ports, and is stopped on exit.
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
THREADS_FLAG=(); [ -n "${LOAD_THREADS:-}" ] && THREADS_FLAG=(--threads "$LOAD_THREADS")
CLUSTER=${CLUSTER:-}
VIA_FOLLOWER=${VIA_FOLLOWER:-0}
CLUSTER_TOML=${CLUSTER_TOML:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-600s}
SERVER_PIN=(); LOAD_PIN=()
if [ "${PIN:-0}" = "1" ]; then SERVER_PIN=(taskset -c 0); LOAD_PIN=(taskset -c 1); fi
if [ -n "$CLUSTER" ] && ! [ "$CLUSTER" -ge 2 ] 2>/dev/null; then
  echo "compare.sh: CLUSTER is a number of nodes, at least 2" >&2; exit 2
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "compare.sh: installing redis-server from Debian's packages" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin sessiond --bin sessiond-bench --bin sessionctl >&2
  BIN=target/release
fi
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

# free_ports, wait_port; start_group.
source benches/ports.sh
source benches/group.sh

# Stops every server of the run (SIGTERM; SIGKILL after 10 s) and deletes the data in DIR.
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

# The servers' PIDs, comma-separated, for sessiond-bench --pids.
pid_list() { local IFS=,; echo "${PIDS[*]}"; }

# bench TARGET OUT ARGS...: one sessiond-bench run with the settings of this comparison.
bench() {
  local target=$1 out=$2; shift 2
  timeout --kill-after=10s "$RUN_TIMEOUT" "${LOAD_PIN[@]}" "$BIN/sessiond-bench" --target "$target" \
    --sessions "$SESSIONS" --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
    --duration "$DURATION" --warmup "$WARMUP" --pids "$(pid_list)" "${RATE_FLAG[@]}" "${THREADS_FLAG[@]}" --json "$@" >"$out"
}

# run_sessiond FSYNC MIX OUT
run_sessiond() {
  local gp ap dir try
  # A free port can be taken before sessiond binds it (by a connection's ephemeral port):
  # then sessiond exits at once, and the next try draws other ports.
  for try in 1 2 3 4 5; do
    read -r gp ap < <(free_ports 2); dir="$WORK/sd-$RANDOM"
    "${SERVER_PIN[@]}" "$BIN/sessiond" --listen "127.0.0.1:$gp" --admin-listen "127.0.0.1:$ap" \
      --data-dir "$dir" --fsync "$1" >"$WORK/sessiond.log" 2>&1 &
    if wait_port "$gp" "$!"; then PIDS+=($!); break; fi
    [ "$try" -lt 5 ] || { echo "sessiond did not start: $(tail -1 "$WORK/sessiond.log")" >&2; return 1; }
  done
  bench "grpc://127.0.0.1:$gp" "$3" --admin-addr "127.0.0.1:$ap" --mix "$2" "${PIPELINE_FLAG[@]}"
  stop_all "$dir"
}

# run_cluster FSYNC MIX OUT [follower]: a group of CLUSTER nodes (benches/group.sh), the load
# on the leader, or on a follower, which forwards to it.
run_cluster() {
  local dir="$WORK/cluster-$RANDOM" target
  start_group "$1" "$dir"
  target=$LEADER
  local follow=()
  [ "${4:-leader}" = "follower" ] && { target=$(((LEADER + 1) % CLUSTER)); follow=(--no-follow-leader); }
  # The node under load first: sessiond-bench's "server" is the first of --pids.
  PIDS=("${GROUP_PID[target]}" $(printf '%s\n' "${GROUP_PID[@]}" | grep -vx "${GROUP_PID[target]}"))
  bench "grpc://127.0.0.1:${GROUP_GRPC[target]}" "$3" --admin-addr "127.0.0.1:${GROUP_ADMIN[target]}" \
    --mix "$2" "${PIPELINE_FLAG[@]}" "${follow[@]}"
  stop_all "$dir"
}

# run_redis APPENDFSYNC MIX OUT [replica]: Redis, and with `replica` a second redis-server
# replicating it (asynchronously, as Redis does), both under the same AOF policy; the load
# goes to the primary.
run_redis() {
  local rp rp2 dir aof
  read -r rp rp2 < <(free_ports 2); dir="$WORK/redis-$RANDOM"; mkdir -p "$dir/primary" "$dir/replica"
  if [ "$1" = "off" ]; then aof=(--appendonly no); else aof=(--appendonly yes --appendfsync "$1"); fi
  "${SERVER_PIN[@]}" redis-server --port "$rp" --bind 127.0.0.1 --dir "$dir/primary" --save '' "${aof[@]}" \
    --daemonize no --protected-mode yes >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$rp"
  if [ "${4:-}" = "replica" ]; then
    "${SERVER_PIN[@]}" redis-server --port "$rp2" --bind 127.0.0.1 --dir "$dir/replica" --save '' "${aof[@]}" \
      --replicaof 127.0.0.1 "$rp" --daemonize no --protected-mode yes >"$WORK/redis-replica.log" 2>&1 &
    PIDS+=($!)
    wait_port "$rp2"
    for _ in $(seq 1 200); do
      redis-cli -p "$rp2" info replication 2>/dev/null | grep -q '^master_link_status:up' && break
      sleep 0.05
    done
    redis-cli -p "$rp2" info replication | grep -q '^master_link_status:up' ||
      { echo "compare.sh: the Redis replica did not connect" >&2; cat "$WORK"/redis*.log >&2; return 1; }
  fi
  bench "redis://127.0.0.1:$rp" "$3" --redis-update "$REDIS_UPDATE" --mix "$2"
  stop_all "$dir"
}

# The servers each round runs, in this order: sessiond and Redis, and with CLUSTER the group
# (and through a follower) and Redis with a replica.
VARIANTS=(sessiond redis)
if [ -n "$CLUSTER" ]; then
  VARIANTS=(sessiond cluster)
  [ "$VIA_FOLLOWER" = "1" ] && VARIANTS+=(via-follower)
  VARIANTS+=(redis redis+replica)
fi
if [ -n "${ONLY:-}" ]; then IFS=, read -r -a VARIANTS <<<"$ONLY"; fi
case ",${VARIANTS[*]}," in
  *cluster*|*via-follower*) [ -n "$CLUSTER" ] || { echo "compare.sh: ONLY=$ONLY needs CLUSTER" >&2; exit 2; } ;;
esac

# compare LABEL SESSIOND_FSYNC REDIS_FSYNC MIX
compare() {
  local label=$1 out="$WORK/$1" r v
  mkdir -p "$out"
  for r in $(seq 1 "$ROUNDS"); do
    for v in "${VARIANTS[@]}"; do
      echo "[$label] round $r/$ROUNDS: $v" >&2
      case "$v" in
        sessiond) run_sessiond "$2" "$4" "$out/$v-$r.json" ;;
        cluster) run_cluster "$2" "$4" "$out/$v-$r.json" leader ;;
        via-follower) run_cluster "$2" "$4" "$out/$v-$r.json" follower ;;
        redis) run_redis "$3" "$4" "$out/$v-$r.json" ;;
        redis+replica) run_redis "$3" "$4" "$out/$v-$r.json" replica ;;
        *) echo "compare.sh: no server called $v" >&2; exit 2 ;;
      esac
    done
  done
  python3 - "$label" "$out" "$ROUNDS" "${CLUSTER:-1}" "${VARIANTS[@]}" <<'PY'
import json, statistics, sys
label, out, rounds, nodes, variants = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
runs = {v: [json.load(open(f"{out}/{v}-{r}.json")) for r in range(1, rounds + 1)] for v in variants}
med = lambda runs, f: statistics.median(f(x) for x in runs)
nan = float("nan")
rows = [
    ("ops/s (all operations)", lambda x: x["overall"]["ops_per_second"]),
    ("p50 latency (us)", lambda x: x["overall"]["p50_us"]),
    ("p99 latency (us)", lambda x: x["overall"]["p99_us"]),
    ("p99.9 latency (us)", lambda x: x["overall"]["p999_us"]),
    ("server CPU (cores busy)", lambda x: (x["server"] or {}).get("cpu_per_second", nan)),
    ("all servers' CPU (cores busy)", lambda x: (x.get("processes") or {}).get("cpu_per_second", nan)),
    # What a user pays for: CPU time per logical session operation (a Redis "operation" is
    # the commands one session operation takes there), in microseconds.
    ("server CPU per op (us)", lambda x: (x["server"] or {}).get("cpu_per_second", nan) * 1e6 / x["overall"]["ops_per_second"]),
    ("all servers' CPU per op (us)", lambda x: (x.get("processes") or {}).get("cpu_per_second", nan) * 1e6 / x["overall"]["ops_per_second"]),
    ("memory per session (bytes)", lambda x: (x["memory_after_populate"] or {}).get("bytes_per_session", nan)),
    # The load generator shares the two cores with the server (unless PIN=1), so its own cost
    # per operation, which differs by protocol, bounds the closed loop too.
    ("load generator CPU per op (us)", lambda x: (x.get("load_generator") or {}).get("cpu_per_second", nan) * 1e6 / x["overall"]["ops_per_second"]),
]
ops = sorted(set.intersection(*(set(runs[v][0]["operations"]) for v in variants)))
rows += [(f"  {op} ops/s", (lambda op: lambda x: x["operations"][op]["ops_per_second"])(op)) for op in ops]
# Column names, and the ratios printed: (numerator, denominator).
names = {"sessiond": "sessiond", "cluster": f"{nodes}-node", "via-follower": "via follower",
         "redis": "redis", "redis+replica": "redis+replica"}
pairs = [(a, b) for a, b in [("sessiond", "redis"), ("cluster", "sessiond"), ("cluster", "redis+replica"),
                             ("via-follower", "cluster"), ("redis+replica", "redis")]
         if a in variants and b in variants]
med_of = {(name, v): med(runs[v], f) for name, f in rows for v in variants}
fmt = lambda x: f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"
print(f"\n== {label}: medians of {rounds} rounds, each running {', '.join(names[v] for v in variants)} in turn ==")
def table(cols, cells):
    w = max(13, *(len(c) + 2 for c in cols))
    print(f"{'metric':<30}" + "".join(f"{c:>{w}}" for c in cols))
    for name, _ in rows:
        print(f"{name:<30}" + "".join(f"{c:>{w}}" for c in cells(name)))
    return w
w = table([names[v] for v in variants], lambda name: [fmt(med_of[(name, v)]) for v in variants])
errs = [str([sum(r["errors"].values()) for r in runs[v]]) for v in variants]
print(f"{'errors per run':<30}" + "".join(f"{e:>{w}}" for e in errs))
if not pairs:  # ONLY= one server, or servers with no pair to compare
    raise SystemExit(0)
print(f"\nratios of the medians (throughput: above 1 is better for the first; latency, CPU, memory: below 1)")
ratio = lambda name, a, b: med_of[(name, a)] / med_of[(name, b)] if med_of[(name, b)] else nan
table([f"{names[a]}/{names[b]}" for a, b in pairs], lambda name: [f"{ratio(name, a, b):.2f}" for a, b in pairs])
PY
}

echo "compare.sh: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)," \
  "${LOAD_PIN[*]:+pinned (servers CPU 0, load CPU 1) }sessions=$SESSIONS concurrency=$CONCURRENCY connections=$CONNECTIONS duration=$DURATION rounds=$ROUNDS${CLUSTER:+ cluster=$CLUSTER}"
case "$MODE" in
  mix)
    FSYNC=${FSYNC:-everysec}
    MIX=${MIX:-get=80,update=12,create=4,destroy=2,regenerate=1,list=1}
    compare "mix-fsync-$FSYNC${PIPELINE_FLAG[*]:+-pipelined}${RATE:+-at-$RATE-ops}${CLUSTER:+-cluster-$CLUSTER}" "$FSYNC" "$FSYNC" "$MIX"
    ;;
  durability)
    MIX=${MIX:-update=80,create=10,destroy=10}
    for policy in no everysec always; do
      compare "writes-fsync-$policy${PIPELINE_FLAG[*]:+-pipelined}${CLUSTER:+-cluster-$CLUSTER}" "$policy" "$policy" "$MIX"
    done
    ;;
  *) echo "compare.sh: MODE is mix or durability" >&2; exit 2 ;;
esac
