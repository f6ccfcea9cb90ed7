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
#   FLASK=1 bash benches/web-compare.sh
#       # also Flask under gunicorn: sessiond_client.flask's SessiondSessionInterface against
#       # Flask-Session's Redis interface (benches/web/flask_app.py), in the same rounds
#
# Environment: ROUNDS (3), DURATION (10s), WARMUP (2s), BROWSERS (64: concurrent virtual
# browsers, one connection and one request in flight each), MIX (read=70,add=25,login=5),
# SKUS (20), TAB_BROWSERS (20), TABS (8), ADDS_PER_TAB (5): the lost-adds check,
# FSYNC (everysec: sessiond's --fsync and Redis's appendfsync), REDIS_POOL (4: tower-sessions'
# Redis connections), RUN_TIMEOUT (300s: the most one load run may take), BIN (a directory
# holding prebuilt sessiond, web-app and web-load binaries: skips the build), FLASK (1: add
# the Flask stacks; installs Flask-Session, redis and gunicorn from PyPI into the venv of
# clients/python/setup-env.sh), GUNICORN_WORKERS (2) and GUNICORN_THREADS (8) (gthread
# workers, which keep connections alive).
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
FLASK=${FLASK:-0}
GUNICORN_WORKERS=${GUNICORN_WORKERS:-2}
GUNICORN_THREADS=${GUNICORN_THREADS:-8}

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
if [ "$FLASK" = "1" ]; then
  PY=$(bash clients/python/setup-env.sh | tail -n1)
  "$PY" -m pip --quiet --disable-pip-version-check --no-input install \
    "Flask-Session>=0.8,<1" "redis>=5,<7" "gunicorn>=22,<24" >&2
  GUNICORN="$(dirname "$PY")/gunicorn"
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

# free_ports, wait_port.
source benches/ports.sh

# started PORT: after a process was started in the background, wait for it to listen on PORT;
# on failure, forget it and fail (the caller tries again on other ports).
started() {
  local pid=$!
  PIDS+=("$pid")
  wait_port "$1" "$pid" 20 && return 0
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset 'PIDS[-1]'
  return 1
}

# attempt3 COMMAND...: COMMAND, tried up to three times.
attempt3() {
  local i
  for i in 1 2 3; do
    "$@" && return 0
    echo "web-compare.sh: $1 failed (attempt $i of 3)" >&2
  done
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

# load APP_PORT OUT: one web-load run against the app; CPU of the store and the app (PIDS,
# the store first, then the app's processes: gunicorn's master and its workers).
load() {
  local pids
  pids=$(IFS=,; echo "${PIDS[*]}")
  timeout --kill-after=10s "$RUN_TIMEOUT" "$BIN/web-load" --target "127.0.0.1:$1" \
    --browsers "$BROWSERS" --duration "$DURATION" --warmup "$WARMUP" --mix "$MIX" --skus "$SKUS" \
    --tab-browsers "$TAB_BROWSERS" --tabs "$TABS" --adds-per-tab "$ADDS_PER_TAB" \
    --pids "$pids" --json >"$2"
}

# start_store sessiond|redis: a fresh store on a free port; STORE_ADDR, STORE_DIR.
start_store() {
  local p a
  STORE_DIR="$WORK/$1-$RANDOM"; mkdir -p "$STORE_DIR"
  case "$1" in
    sessiond)
      read -r p a < <(free_ports 2)
      "$BIN/sessiond" --listen "127.0.0.1:$p" --admin-listen "127.0.0.1:$a" \
        --data-dir "$STORE_DIR/data" --fsync "$FSYNC" >"$WORK/sessiond.log" 2>&1 &
      started "$p" || return 1
      STORE_ADDR="http://127.0.0.1:$p"
      ;;
    redis)
      read -r p < <(free_ports 1)
      redis-server --port "$p" --bind 127.0.0.1 --dir "$STORE_DIR" --save '' --appendonly yes \
        --appendfsync "$FSYNC" --daemonize no --protected-mode yes >"$WORK/redis.log" 2>&1 &
      started "$p" || return 1
      STORE_ADDR="redis://127.0.0.1:$p"
      ;;
  esac
}

# start_app STACK: the stack's app on a free port, over STORE_ADDR; APP_PORT.
start_app() {
  local store=${1#*-} hp app
  read -r hp < <(free_ports 1)
  case "$1" in
    rust-sessiond)
      "$BIN/web-app" --store sessiond --sessiond "$STORE_ADDR" --listen "127.0.0.1:$hp" \
        >"$WORK/web-app.log" 2>&1 & ;;
    rust-redis)
      "$BIN/web-app" --store redis --redis "$STORE_ADDR" --redis-pool "$REDIS_POOL" \
        --listen "127.0.0.1:$hp" >"$WORK/web-app.log" 2>&1 & ;;
    flask-*)
      (cd benches/web && WEB_STORE=$store SESSIOND_ADDR=${STORE_ADDR#http://} REDIS_URL=$STORE_ADDR \
        exec "$GUNICORN" --workers "$GUNICORN_WORKERS" --worker-class gthread \
        --threads "$GUNICORN_THREADS" --bind "127.0.0.1:$hp" 'flask_app:create_app()') \
        >"$WORK/web-app.log" 2>&1 & ;;
    *) echo "web-compare.sh: no stack called $1" >&2; exit 2 ;;
  esac
  app=$!
  started "$hp" || return 1
  APP_PORT=$hp
  # gunicorn's workers are the master's children: wait for all of them, measure them all.
  if [ "${1%%-*}" = "flask" ]; then
    for _ in $(seq 1 200); do
      [ "$(pgrep -P "$app" | wc -l)" -ge "$GUNICORN_WORKERS" ] && break
      sleep 0.05
    done
    # shellcheck disable=SC2207
    PIDS+=($(pgrep -P "$app"))
  fi
}

# run STACK OUT: one stack (rust-sessiond, rust-redis, flask-sessiond, flask-redis) fresh:
# its store, its app, the load, then everything stopped.
run() {
  attempt3 start_store "${1#*-}"
  attempt3 start_app "$1"
  load "$APP_PORT" "$2"
  stop_all "$STORE_DIR"
}

STACKS=(rust-sessiond rust-redis)
[ "$FLASK" = "1" ] && STACKS+=(flask-sessiond flask-redis)

echo "web-compare.sh: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)," \
  "browsers=$BROWSERS mix=$MIX duration=$DURATION rounds=$ROUNDS fsync=$FSYNC"
for r in $(seq 1 "$ROUNDS"); do
  for stack in "${STACKS[@]}"; do
    echo "round $r/$ROUNDS: $stack" >&2
    run "$stack" "$WORK/$stack-$r.json"
  done
done

python3 - "$WORK" "$ROUNDS" "${STACKS[@]}" <<'PY'
import json, statistics, sys
out, rounds, stacks = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {s: [json.load(open(f"{out}/{s}-{r}.json")) for r in range(1, rounds + 1)] for s in stacks}
nan = float("nan")
procs = lambda x: (x.get("processes") or {}).get("per_process") or [nan, nan]
rows = [
    ("requests/s", lambda x: x["overall"]["ops_per_second"]),
    ("p50 latency (us)", lambda x: x["overall"]["p50_us"]),
    ("p99 latency (us)", lambda x: x["overall"]["p99_us"]),
    ("p99.9 latency (us)", lambda x: x["overall"]["p999_us"]),
    ("app + store CPU (cores)", lambda x: sum(procs(x))),
    ("  app CPU (cores)", lambda x: sum(procs(x)[1:])),
    ("  store CPU (cores)", lambda x: procs(x)[0]),
]
for op in ("read", "add", "login"):
    rows.append((f"  {op} requests/s", (lambda op: lambda x: x["operations"][op]["ops_per_second"])(op)))
    rows.append((f"  {op} p99 (us)", (lambda op: lambda x: x["operations"][op]["p99_us"])(op)))
med = {(n, s): statistics.median(f(x) for x in runs[s]) for n, f in rows for s in stacks}
fmt = lambda x: f"{x:.2f}" if abs(x) < 10 else f"{x:.0f}"
names = {"rust-sessiond": "axum+sessiond", "rust-redis": "tower-sess+redis",
         "flask-sessiond": "flask+sessiond", "flask-redis": "flask-sess+redis"}
for web in ("rust", "flask"):
    a, b = f"{web}-sessiond", f"{web}-redis"
    if a not in stacks:
        continue
    print(f"\n== {web}: medians of {rounds} rounds, each running {', '.join(names[s] for s in stacks)} in turn ==")
    print(f"{'metric':<28}{names[a]:>18}{names[b]:>18}{'ratio':>8}")
    for n, _ in rows:
        x, y = med[(n, a)], med[(n, b)]
        print(f"{n:<28}{fmt(x):>18}{fmt(y):>18}{(x / y if y else nan):>8.2f}")
    errs = {s: str([sum(r["errors"].values()) for r in runs[s]]) for s in (a, b)}
    print(f"{'error answers per run':<28}{errs[a]:>18}{errs[b]:>18}")
    print("lost cart adds per run (concurrent tabs of one browser, distinct items):")
    for s in (a, b):
        cells = []
        for x in runs[s]:
            l = x.get("lost_adds") or {}
            cells.append(f"{l.get('lost', '-')} of {l.get('acknowledged', '-')} lost"
                         + (f" ({l['failed']} failed)" if l.get("failed") else ""))
        print(f"  {names[s]:<18}{'; '.join(cells)}")
print("\nratio: sessiond stack / Redis stack (requests/s: above 1 is better; latency, CPU: below 1)")
PY
