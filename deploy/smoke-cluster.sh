#!/usr/bin/env bash
# The deployment manifests' cluster, on this machine: three sessiond processes configured as
# the compose file and the StatefulSet configure their nodes (the [cluster] section in the
# one variable SESSIOND_CLUSTER), on loopback addresses 127.0.0.11-13 instead of a container
# network and without TLS, and the init Job's two sessionctl steps run against them.
#
# Checks: the steps form a group of three voters, and running them again changes nothing;
# a write through one node is read through another; a node that loses its data directory
# and comes back under a new ID founds no cluster of its own when the steps run again, is
# refused by add while its old member holds its address, and rejoins once that member is
# removed.
#
#   cargo build --bin sessiond --bin sessionctl && deploy/smoke-cluster.sh
# SESSIOND and SESSIONCTL name other binaries (default: target/debug/). Ports 7420-7422 on
# 127.0.0.11-13 must be free. Takes about half a minute; everything it starts is stopped, and
# its directory removed, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIOND=${SESSIOND:-target/debug/sessiond}
SESSIONCTL=${SESSIONCTL:-target/debug/sessionctl}
# The init Job gives 10m; here a node that has not answered within this has failed.
WAIT=60s
IPS=(127.0.0.11 127.0.0.12 127.0.0.13)
PEERS="${IPS[0]}:7422,${IPS[1]}:7422,${IPS[2]}:7422"

dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  for n in 0 1 2; do echo "--- node $n log (tail)" >&2; tail -5 "$dir/n$n.log" >&2 || true; done
  exit 1
}

ctl() { timeout 120 "$SESSIONCTL" --timeout 5s "$@"; }

# Node N, as a manifest starts it: a config file for what all share, SESSIOND_CLUSTER for
# its own addresses.
start() {
  local n=$1 ip=${IPS[$1]}
  printf '%s\n' "listen = \"$ip:7420\"" "admin_listen = \"$ip:7421\"" "data_dir = \"$dir/data$n\"" \
    "fsync = \"no\"" >"$dir/n$n.toml"
  SESSIOND_CLUSTER="{peer_listen=\"$ip:7422\", advertise_peer=\"$ip:7422\", advertise_client=\"$ip:7420\"}" \
    RUST_LOG=warn "$SESSIOND" --config "$dir/n$n.toml" >>"$dir/n$n.log" 2>&1 &
  pids[n]=$!
}

# The init Job's (and compose's cluster-init and cluster-add) steps.
job() {
  ctl cluster init --peer "${IPS[0]}:7422" --group "${IPS[1]}:7422,${IPS[2]}:7422" --wait "$WAIT" \
    >"$dir/init.out" || fail "init: $(cat "$dir/init.out")"
  ctl cluster add --peer "$PEERS" --node "$PEERS" --wait "$WAIT" >"$dir/add.out" \
    || fail "add: $(cat "$dir/add.out")"
}

# A field of the --json answer of `sessionctl ARGS...`: field NAME ARGS...
field() {
  local name=$1; shift
  ctl --json "$@" | python3 -c "import json, sys; v = json.load(sys.stdin)['$name']; print(len(v) if isinstance(v, list) else v)"
}
voters() { field voters cluster status --peer "$1"; }

for n in 0 1 2; do start "$n"; done

echo "== the init Job, first run"
job
head -1 "$dir/init.out"
head -3 "$dir/add.out"
[ "$(voters "${IPS[2]}:7422")" = 3 ] || fail "3 voters expected: $(ctl cluster status --peer "${IPS[2]}:7422")"

echo "== the init Job, again"
job
grep -q "no new cluster started" "$dir/init.out" || fail "init again: $(cat "$dir/init.out")"
[ "$(grep -c 'already a voter' "$dir/add.out")" = 3 ] || fail "add again: $(cat "$dir/add.out")"
echo "ok: nothing changed"

echo "== a write through node 1, read through node 2"
id=$(field id --addr "${IPS[1]}:7420" create --user alice --set cart=3)
ctl --addr "${IPS[2]}:7420" get "$id" | grep -q cart || fail "the session is not read through node 2"
echo "ok"

echo "== node 0 loses its data and comes back under a new ID"
old=$(field node_id cluster status --peer "${IPS[0]}:7422")
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
rm -rf "$dir/data0"
start 0
# The Job again: init must start no second cluster, and add must refuse node 0 while its old
# member holds the address.
ctl cluster init --peer "${IPS[0]}:7422" --group "${IPS[1]}:7422,${IPS[2]}:7422" --wait "$WAIT" \
  >"$dir/init.out" || fail "init after the wipe: $(cat "$dir/init.out")"
grep -q "no new cluster started" "$dir/init.out" || fail "init after the wipe: $(cat "$dir/init.out")"
set +e
ctl cluster add --peer "$PEERS" --node "$PEERS" --wait "$WAIT" >"$dir/add.out" 2>&1
code=$?
set -e
if [ "$code" != 9 ] || ! grep -q "is still a member" "$dir/add.out"; then
  fail "add after the wipe (exit $code): $(cat "$dir/add.out")"
fi
echo "ok: refused while node $old holds the address"
ctl cluster remove --peer "$PEERS" --id "$old" >/dev/null || fail "remove $old"
job
[ "$(voters "${IPS[1]}:7422")" = 3 ] || fail "3 voters expected: $(ctl cluster status --peer "${IPS[1]}:7422")"
ctl --addr "${IPS[0]}:7420" get "$id" | grep -q cart || fail "the session is not read through the new node 0"
ctl cluster status --peer "${IPS[0]}:7422"
echo "smoke-cluster: ok"
