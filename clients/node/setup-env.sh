#!/usr/bin/env bash
# Installs the Node packages the tests need, each with `npm ci` from its committed lockfile:
# clients/node (the client, the Express middleware, the type checker) and
# examples/storefront-express (which installs a copy of the client). Installs a package again
# only when its node_modules is missing or its lockfile (or, for the storefront, the client
# it copies) changed since the last install. Idempotent and quiet.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
storefront="$(cd "$here/../../examples/storefront-express" && pwd)"

command -v node >/dev/null || { echo "setup-env.sh: node (>= 18) is not installed" >&2; exit 1; }
command -v npm >/dev/null || { echo "setup-env.sh: npm is not installed" >&2; exit 1; }

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
