#!/usr/bin/env bash
# Runs the storefront conformance suite: the HTTP contract and the mixed run, against every
# adapter's storefront (axum, Flask, Django, Express) behind one sessiond.
#
#   bash tests/conformance/run.sh [pytest args...]   (-k django, -x, ...)
#
# Sets up target/python-venv (clients/python/setup-env.sh; SESSIOND_PY names another
# interpreter with the same packages), builds sessiond and the axum storefront unless
# SESSIOND_BIN and STOREFRONT_BIN name them, installs the Express storefront's node packages
# (clients/node/setup-env.sh), and runs pytest. Every process the suite starts listens on ephemeral
# loopback ports and is stopped at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

py="${SESSIOND_PY:-$(bash "$root/clients/python/setup-env.sh" | tail -n 1)}"

# Up to date with the source (a no-op when they already are), unless given.
if [ -z "${SESSIOND_BIN:-}" ] || [ -z "${STOREFRONT_BIN:-}" ]; then
  (cd "$root" && cargo build --quiet --bin sessiond --bin storefront)
fi
export SESSIOND_BIN="${SESSIOND_BIN:-$root/target/debug/sessiond}"
export STOREFRONT_BIN="${STOREFRONT_BIN:-$root/target/debug/storefront}"
for bin in "$SESSIOND_BIN" "$STOREFRONT_BIN"; do
  [ -x "$bin" ] || { echo "run.sh: $bin is not an executable" >&2; exit 1; }
done

# The Express storefront's packages (npm ci from the committed lockfiles, when changed).
bash "$root/clients/node/setup-env.sh"

cd "$root"
exec "$py" -m pytest -q -p no:cacheprovider -rsx tests/conformance "$@"
