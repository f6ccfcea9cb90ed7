# The daemon binaries a test suite's run script needs (sourced, not run).

# need_bins VAR=BIN...: for each VAR not set, builds cargo's BIN (target/debug, one cargo call
# for all of them, a no-op when they are up to date with the source) and exports VAR as its
# path; then every VAR must name an executable.
need_bins() {
  local root pair var
  local -a build=()
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  for pair in "$@"; do
    var=${pair%%=*}
    if [ -z "${!var:-}" ]; then
      build+=(--bin "${pair#*=}")
      export "$var=$root/target/debug/${pair#*=}"
    fi
  done
  [ "${#build[@]}" -eq 0 ] || (cd "$root" && cargo build --quiet "${build[@]}")
  for pair in "$@"; do
    var=${pair%%=*}
    [ -x "${!var}" ] || { echo "${0##*/}: $var=${!var} is not an executable" >&2; return 1; }
  done
}
