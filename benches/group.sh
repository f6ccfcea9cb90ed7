# A replicated group for the bench scripts (sourced, not run; needs benches/ports.sh). The
# sourcing script sets BIN (sessiond and sessionctl), WORK (where the nodes' logs go), CLUSTER
# (the number of nodes), CLUSTER_TOML (lines added to each node's [cluster] section, may be
# empty), SERVER_PIN (a command prefix, may be empty) and PIDS (an array the nodes are added to).

# start_group FSYNC DIR: CLUSTER nodes on loopback with their data under DIR, the first
# bootstrapped and the others added with `sessionctl cluster add` (learner, catch up, voter).
# Sets GROUP_GRPC, GROUP_ADMIN, GROUP_PEER and GROUP_PID (one entry per node) and LEADER (the
# index of the node that leads once all are voters).
start_group() {
  local fsync=$1 dir=$2 ports i peer1 leader
  GROUP_GRPC=(); GROUP_ADMIN=(); GROUP_PEER=(); GROUP_PID=(); LEADER=""
  read -r -a ports < <(free_ports $((3 * CLUSTER)))
  for i in $(seq 0 $((CLUSTER - 1))); do
    GROUP_GRPC+=("${ports[3 * i]}"); GROUP_ADMIN+=("${ports[3 * i + 1]}"); GROUP_PEER+=("${ports[3 * i + 2]}")
    mkdir -p "$dir/n$i"
    printf '%s\n' "listen = \"127.0.0.1:${GROUP_GRPC[i]}\"" "admin_listen = \"127.0.0.1:${GROUP_ADMIN[i]}\"" \
      "data_dir = \"$dir/n$i/data\"" "fsync = \"$fsync\"" "[cluster]" \
      "peer_listen = \"127.0.0.1:${GROUP_PEER[i]}\"" "$CLUSTER_TOML" >"$dir/n$i/sessiond.toml"
    local boot=(); [ "$i" -eq 0 ] && boot=(--bootstrap)
    "${SERVER_PIN[@]}" "$BIN/sessiond" --config "$dir/n$i/sessiond.toml" "${boot[@]}" >"$WORK/cluster-n$i.log" 2>&1 &
    GROUP_PID+=($!); PIDS+=($!)
  done
  for i in $(seq 0 $((CLUSTER - 1))); do wait_port "${GROUP_GRPC[i]}"; wait_port "${GROUP_PEER[i]}"; done
  peer1="127.0.0.1:${GROUP_PEER[0]}"
  for i in $(seq 1 $((CLUSTER - 1))); do
    timeout 150s "$BIN/sessionctl" cluster --peer "$peer1" --wait 120s add --node "127.0.0.1:${GROUP_PEER[i]}" >/dev/null
  done
  leader=$(timeout 30s "$BIN/sessionctl" --json cluster --peer "$peer1" status |
    python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["leader"]["client_addr"] if s["leader"] and len(s["voters"]) == int(sys.argv[1]) else "")' "$CLUSTER")
  for i in $(seq 0 $((CLUSTER - 1))); do
    [ "$leader" = "127.0.0.1:${GROUP_GRPC[i]}" ] && LEADER=$i
  done
  [ -n "$LEADER" ] || { echo "${0##*/}: the group has no leader with $CLUSTER voters" >&2; cat "$WORK"/cluster-n*.log >&2; return 1; }
}
