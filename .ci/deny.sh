#!/usr/bin/env bash
# Licences, bans and sources always; advisories when the RustSec database can be reached
# (it lives in a git repository, which a registry-only network cannot fetch).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deny >/dev/null 2>&1; then
  cargo install --locked cargo-deny
fi
cargo deny --locked check licenses bans sources
if cargo deny --locked fetch db >/dev/null 2>&1; then
  cargo deny --locked check advisories
else
  echo "cargo deny: advisories SKIPPED: the RustSec advisory database cannot be fetched from this network"
fi
