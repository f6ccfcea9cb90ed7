#!/usr/bin/env bash
# Runs the Node client's tests: the typecheck of its declarations (tsc --noEmit on
# test/typed-usage.ts), the client and the Express middleware against a real sessiond, and
# the Express storefront's HTTP contract (examples/storefront-express).
#
#   bash clients/node/run-tests.sh [node --test args...]
#
# Installs each package's node_modules with `npm ci` from its committed lockfile, only when
# node_modules is missing or the lockfile (or, for the storefront, the client it copies)
# changed since the last install. Uses SESSIOND_BIN if set, else brings
# target/debug/sessiond up to date with cargo. Every daemon and app the tests start listens
# on ephemeral loopback ports and is stopped at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
storefront="$root/examples/storefront-express"

command -v node >/dev/null || { echo "run-tests.sh: node (>= 18) is not installed" >&2; exit 1; }
command -v npm >/dev/null || { echo "run-tests.sh: npm is not installed" >&2; exit 1; }

# npm ci in $1 unless its stamp matches the hash of the files after it.
install() {
  local dir="$1"
  shift
  local stamp="$dir/node_modules/.sessiond-stamp"
  local want have
  want="$(cat "$@" | sha256sum | cut -d' ' -f1)"
  have="$(cat "$stamp" 2>/dev/null || true)"
  if [ "$have" != "$want" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$want" >"$stamp"
  fi
}

install "$here" "$here/package-lock.json"
# The storefront installs a copy of the client (install-links), so a change to the client's
# files is a reason to install again.
install "$storefront" "$storefront/package-lock.json" "$here/package.json" \
  $(cd "$here" && find lib proto -type f | LC_ALL=C sort | sed "s|^|$here/|")

bin="${SESSIOND_BIN:-$root/target/debug/sessiond}"
if [ -z "${SESSIOND_BIN:-}" ]; then
  # Up to date with the source (a no-op when it already is).
  (cd "$root" && cargo build --quiet --bin sessiond)
elif [ ! -x "$bin" ]; then
  echo "run-tests.sh: SESSIOND_BIN=$bin is not an executable" >&2
  exit 1
fi

(cd "$here" && node_modules/.bin/tsc -p test/tsconfig.json)

[ "$#" -gt 0 ] || set -- "$here/test/" "$storefront/test/"
SESSIOND_BIN="$bin" exec node --test "$@"
