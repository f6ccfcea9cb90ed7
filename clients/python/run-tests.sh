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

bin="${SESSIOND_BIN:-$root/target/debug/sessiond}"
if [ -z "${SESSIOND_BIN:-}" ]; then
  # Up to date with the source (a no-op when it already is).
  (cd "$root" && cargo build --quiet --bin sessiond)
elif [ ! -x "$bin" ]; then
  echo "run-tests.sh: SESSIOND_BIN=$bin is not an executable" >&2
  exit 1
fi

cd "$here"
[ "$#" -gt 0 ] || set -- tests
SESSIOND_BIN="$bin" exec "$py" -m pytest -q -p no:cacheprovider "$@"
