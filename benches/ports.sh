# Loopback port helpers for the bench scripts (sourced, not run). The sourcing script sets
# WORK, the directory whose *.log files wait_port prints when a server never listens.

# free_ports N: N distinct free loopback ports (all held open while choosing, so none repeats).
free_ports() {
  python3 -c 'import socket,sys
socks=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# wait_port PORT: until something listens on PORT (about 10 s at most).
wait_port() {
  for _ in $(seq 1 200); do
    python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$1)))" && return 0
    sleep 0.05
  done
  echo "${0##*/}: nothing listens on port $1; server output:" >&2
  cat "$WORK"/*.log >&2 || true
  return 1
}
