#!/usr/bin/env bash
# Where sessiond's CPU goes under a session workload: starts a release sessiond on loopback,
# drives it with sessiond-bench, and over the measured window
#   1. samples it with `perf record` (call graphs) and prints the CPU per operation split by
#      what the time is spent on (HTTP/2, protobuf, tonic and tower, the store, the log,
#      snapshots, the tokio scheduler, allocation, the kernel's network and wakeups), and by
#      thread;
#   2. in a second run of the same load, counts malloc calls per operation with a uprobe
#      (which slows every malloc, so it never shares a run with the profile).
#
#   RATE=30000 bash benches/profile.sh      # open loop at 30,000 ops/s (e.g. half load)
#   bash benches/profile.sh                 # closed loop
#   CLUSTER=3 bash benches/profile.sh       # the leader of a 3-node group (load on the leader)
#   CLUSTER=3 ROLE=follower bash benches/profile.sh   # one of its followers
#   SIDE=client bash benches/profile.sh     # the client side: sessiond-bench, which calls
#                                           # through sessiond-client as an app does
#
# Environment: RATE (ops/s offered; unset = closed loop), PIPELINE (1, the default: Pipeline
# streams; 0: unary calls), DURATION (10s), WARMUP (2s), SESSIONS (100000), CONCURRENCY (50),
# CONNECTIONS (4), FSYNC (everysec), MIX (the default mix of benches/compare.sh), BIN (a
# directory holding prebuilt sessiond and sessiond-bench), PIN (1: sessiond on CPU 0, the
# load generator on CPU 1), KEEP (a directory to keep perf.data and the reports in),
# SYMBOLS (the number of hottest symbols listed, 25), CLUSTER (N >= 2: profile the leader of a
# group of N nodes on loopback instead of a single node), CLUSTER_TOML (lines added to each
# node's [cluster] section), ROLE (with CLUSTER: leader, the default, or follower: profile a
# follower while the load goes to the leader), SIDE (server, the default, or client: sample
# the load generator, i.e. sessiond-client and the generator's own bookkeeping, instead),
# LOAD_THREADS (sessiond-bench's worker threads; unset: its default).
# Needs perf (Debian's linux-perf, installed here if missing) and root for the uprobe.
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
SESSIONS=${SESSIONS:-100000}
CONCURRENCY=${CONCURRENCY:-50}
CONNECTIONS=${CONNECTIONS:-4}
FSYNC=${FSYNC:-everysec}
MIX=${MIX:-get=80,update=12,create=4,destroy=2,regenerate=1,list=1}
SYMBOLS=${SYMBOLS:-25}
PIPELINE_FLAG=(--pipeline); [ "${PIPELINE:-1}" = "0" ] && PIPELINE_FLAG=()
RATE_FLAG=(); [ -n "$RATE" ] && RATE_FLAG=(--rate "$RATE")
THREADS_FLAG=(); [ -n "${LOAD_THREADS:-}" ] && THREADS_FLAG=(--threads "$LOAD_THREADS")
SERVER_PIN=(); LOAD_PIN=()
if [ "${PIN:-0}" = "1" ]; then SERVER_PIN=(taskset -c 0); LOAD_PIN=(taskset -c 1); fi
seconds=$(python3 -c 'import re,sys; m=re.fullmatch(r"(\d+)(ms|s|m)?", sys.argv[1]); n=int(m[1]); print({"ms":n/1000,"m":n*60}.get(m[2], n))' "$DURATION")

if ! command -v perf >/dev/null 2>&1; then
  echo "profile.sh: installing perf from Debian's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin sessiond --bin sessiond-bench --bin sessionctl >&2
  BIN=target/release
fi
WORK=$(mktemp -d)
OUT=${KEEP:-$WORK}
mkdir -p "$OUT"
CLUSTER=${CLUSTER:-}
CLUSTER_TOML=${CLUSTER_TOML:-}
ROLE=${ROLE:-leader}
SIDE=${SIDE:-server}
case "$SIDE" in server|client) ;; *) echo "profile.sh: SIDE is server or client" >&2; exit 2 ;; esac
# The generator exits as its window ends, and perf must be done by then: it sends its
# workload a SIGTERM that reaches this script if the process it samples exits first.
[ "$SIDE" = "client" ] && seconds=$(python3 -c "print(max(float('$seconds') - 1, 0.5))")
SERVER=""
PIDS=()
source benches/ports.sh  # free_ports, wait_port
source benches/group.sh  # start_group
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do if [ -n "$p" ]; then kill -KILL "$p" 2>/dev/null || true; fi; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_sessiond: a fresh sessiond (or, with CLUSTER, group) with its own data directory; sets
# SERVER (the process profiled: the single node, or the group's leader or a follower, by ROLE)
# and GRPC, ADMIN (the ports the load goes to).
start_sessiond() {
  rm -rf "$WORK/data"
  if [ -n "$CLUSTER" ]; then
    start_group "$FSYNC" "$WORK/data"
    SERVER=${GROUP_PID[LEADER]}; GRPC=${GROUP_GRPC[LEADER]}; ADMIN=${GROUP_ADMIN[LEADER]}
    if [ "$ROLE" = "follower" ]; then SERVER=${GROUP_PID[(LEADER + 1) % CLUSTER]}; fi
    return 0
  fi
  read -r GRPC ADMIN < <(free_ports 2)
  "${SERVER_PIN[@]}" "$BIN/sessiond" --listen "127.0.0.1:$GRPC" --admin-listen "127.0.0.1:$ADMIN" \
    --data-dir "$WORK/data" --fsync "$FSYNC" >"$WORK/sessiond.log" 2>&1 &
  SERVER=$!; PIDS+=($!)
  wait_port "$GRPC"
}

stop_sessiond() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=(); SERVER=""
}

# measure REPORT CMD...: one bench run; CMD (given the server's PID as its last argument)
# runs once the measured window opens, for the window's length.
measure() {
  local report=$1; shift
  start_sessiond
  "${LOAD_PIN[@]}" "$BIN/sessiond-bench" --target "grpc://127.0.0.1:$GRPC" --admin-addr "127.0.0.1:$ADMIN" \
    --sessions "$SESSIONS" --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
    --duration "$DURATION" --warmup "$WARMUP" --pids "$SERVER" --mix "$MIX" \
    "${PIPELINE_FLAG[@]}" "${RATE_FLAG[@]}" "${THREADS_FLAG[@]}" --json >"$report" 2>"$WORK/bench.err" &
  local bench=$!
  for _ in $(seq 1 3000); do
    grep -q '^sessiond-bench: measuring' "$WORK/bench.err" && break
    kill -0 "$bench" 2>/dev/null || break
    sleep 0.1
  done
  grep -q '^sessiond-bench: measuring' "$WORK/bench.err" ||
    { echo "profile.sh: the load never reached its measured window:" >&2; cat "$WORK/bench.err" >&2; return 1; }
  if [ "$SIDE" = "client" ]; then "$@" "$bench"; else "$@" "$SERVER"; fi
  wait "$bench" || { echo "profile.sh: sessiond-bench failed:" >&2; cat "$WORK/bench.err" >&2; return 1; }
  stop_sessiond
}

record() { perf record -q -F 999 --call-graph dwarf,16384 -o "$OUT/perf.data" -p "$1" -- sleep "$seconds" 2>/dev/null; }

probe=probe_libc:malloc
libc=$(ldd "$BIN/sessiond" | awk '/libc.so/ {print $3}')
count_mallocs() { perf stat -x, -e "$probe" -o "$OUT/mallocs.csv" -p "$1" -- sleep "$seconds"; }

echo "profile.sh: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)," \
  "${RATE:+rate=$RATE ops/s }${PIPELINE_FLAG[*]:+pipelined }${LOAD_PIN[*]:+pinned }${CLUSTER:+cluster=$CLUSTER (the $ROLE) }fsync=$FSYNC duration=$DURATION" >&2
echo "profile.sh: run 1, perf record" >&2
measure "$OUT/profile.json" record
perf report -i "$OUT/perf.data" --no-children --sort sym -g none --stdio --percent-limit 0 2>/dev/null >"$OUT/symbols.txt"
perf report -i "$OUT/perf.data" --no-children --sort comm -g none --stdio 2>/dev/null >"$OUT/threads.txt"
perf script -i "$OUT/perf.data" -F comm,ip,sym 2>/dev/null >"$OUT/stacks.txt"

echo "profile.sh: run 2, malloc calls (uprobe on $libc)" >&2
perf probe -q -x "$libc" --add malloc 2>/dev/null || perf probe -l 2>/dev/null | grep -q "$probe" ||
  { echo "profile.sh: cannot place a uprobe on malloc (needs root and uprobes)" >&2; exit 1; }
measure "$OUT/mallocs.json" count_mallocs

python3 benches/profile_report.py "$OUT" "$SYMBOLS" "$SIDE"
