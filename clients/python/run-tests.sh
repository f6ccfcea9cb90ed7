#!/usr/bin/env bash
# Runs the Python client's tests: the client against a real sessiond, the Flask session
# interface, the Django session engine, and what is particular to the Flask storefront (the
# HTTP contract all storefronts share: tests/conformance/run.sh).
#
#   bash clients/python/run-tests.sh [pytest args...]   (paths relative to clients/python)
#
# Sets up target/python-venv (setup-env.sh), brings target/debug/sessiond up to date
# (SESSIOND_BIN overrides the binary), and runs pytest. Every daemon and app the tests start
# listens on ephemeral loopback ports and is stopped at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

py="$(bash "$here/setup-env.sh" | tail -n 1)"

source "$root/tests/bins.sh"
need_bins SESSIOND_BIN=sessiond

cd "$here"
[ "$#" -gt 0 ] || set -- tests
exec "$py" -m pytest -q -p no:cacheprovider "$@"
