#!/usr/bin/env bash
# Runs the Node client's tests: the typecheck of its declarations (tsc --noEmit on
# test/typed-usage.ts), the client and the Express middleware against a real sessiond, and
# the Express storefront's HTTP contract (examples/storefront-express).
#
#   bash clients/node/run-tests.sh [node --test args...]
#
# Installs each package's node_modules with `npm ci` from its committed lockfile
# (setup-env.sh, only when something changed). Uses SESSIOND_BIN if set, else brings
# target/debug/sessiond up to date with cargo. Every daemon and app the tests start listens
# on ephemeral loopback ports and is stopped at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
storefront="$root/examples/storefront-express"

bash "$here/setup-env.sh"

source "$root/tests/bins.sh"
need_bins SESSIOND_BIN=sessiond

(cd "$here" && node_modules/.bin/tsc -p test/tsconfig.json)

[ "$#" -gt 0 ] || set -- "$here/test/" "$storefront/test/"
exec node --test "$@"
