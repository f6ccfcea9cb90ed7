# Loopback port helpers for the bench scripts (sourced, not run). The sourcing script sets
# WORK, the directory whose *.log files wait_port prints when a server never listens.

# free_ports N: N distinct free loopback ports (all held open while choosing, so none repeats).
free_ports() {
  python3 -c 'import socket,sys
socks=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# wait_port PORT [PID [SECONDS]]: until something listens on PORT, for SECONDS (10) at most.
# With PID, fails at once if that process has exited (a free port taken meanwhile by another
# program: the caller can try another).
wait_port() {
  local deadline=$((SECONDS + ${3:-10}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if [ -n "${2:-}" ]; then kill -0 "$2" 2>/dev/null || return 1; fi
    python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$1)))" && return 0
    sleep 0.05
  done
  echo "${0##*/}: nothing listens on port $1; server output:" >&2
  cat "$WORK"/*.log >&2 || true
  return 1
}
