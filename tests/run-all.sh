#!/usr/bin/env bash
# The whole test suite, the README's test command (and CI's test step):
#   1. cargo test: the Rust workspace (the daemon, the Rust client, sessionctl and
#      sessiond-bench, the storefront demo);
#   2. the Python client, Flask and Django suites (clients/python/run-tests.sh);
#   3. the Node client, Express middleware and storefront suites (clients/node/run-tests.sh);
#   4. the storefront conformance suite: axum, Flask, Django and Express, alone and mixed
#      (tests/conformance/run.sh).
# Each script installs what it needs itself (a Python venv from PyPI under target/, Node
# packages with `npm ci` from the committed lockfiles). Stops at the first suite that fails.
#
#   bash tests/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Rust workspace (cargo test)"
cargo test --locked

step "Python client, Flask and Django"
bash clients/python/run-tests.sh

step "Node client, Express middleware and storefront"
bash clients/node/run-tests.sh

step "storefront conformance suite"
bash tests/conformance/run.sh
