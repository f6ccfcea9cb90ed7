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

source "$root/tests/bins.sh"
need_bins SESSIOND_BIN=sessiond STOREFRONT_BIN=storefront

# The Express storefront's packages (npm ci from the committed lockfiles, when changed).
bash "$root/clients/node/setup-env.sh"

cd "$root"
exec "$py" -m pytest -q -p no:cacheprovider -rsx tests/conformance "$@"
