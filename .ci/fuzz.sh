#!/usr/bin/env bash
# Fuzz targets (fuzz/, see fuzz/README.md).
#
# Always, on the default (stable) toolchain: builds every target and the seed generator, and
# replays the saved crash inputs in fuzz/regressions/<target>/ through the targets, so a
# fixed bug stays fixed. Stable builds lack coverage instrumentation, so no fuzzing here.
#
# Then, when a nightly toolchain and cargo-fuzz are installed, fuzzes each target for
# FUZZ_SECONDS (default 20) from seeds written by fuzz/examples/seed_corpus.rs; otherwise it
# says why the run is skipped and exits 0. FUZZ_INSTALL=1 installs cargo-fuzz if missing.
# FUZZ_TARGETS limits the targets (space-separated names).
set -euo pipefail
cd "$(dirname "$0")/.."

manifest=fuzz/Cargo.toml
targets=${FUZZ_TARGETS:-session_id requests persist_records}
seconds=${FUZZ_SECONDS:-20}

# Not --locked: fuzz/Cargo.lock follows the main crate's dependencies, and cargo adds what they
# gained since it was last committed (existing pins stay as they are).
cargo build --manifest-path "$manifest" --bins --examples

for target in $targets; do
  inputs=(fuzz/regressions/"$target"/*)
  [[ -e "${inputs[0]}" ]] || continue
  log=$(mktemp)
  # libFuzzer runs each file given as an argument once; a panic fails the run.
  if cargo run --quiet --manifest-path "$manifest" --bin "$target" -- "${inputs[@]}" >"$log" 2>&1; then
    echo "fuzz: $target: ${#inputs[@]} regression input(s) pass"
    rm -f "$log"
  else
    cat "$log"
    rm -f "$log"
    echo "fuzz: $target: a regression input in fuzz/regressions/$target/ fails (output above)"
    exit 1
  fi
done

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: run SKIPPED: no nightly toolchain (cargo-fuzz needs one: rustup toolchain install nightly); targets built and regressions replayed only"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  if [[ "${FUZZ_INSTALL:-0}" == 1 ]]; then
    cargo install --locked cargo-fuzz
  else
    echo "fuzz: run SKIPPED: cargo-fuzz is not installed (cargo install --locked cargo-fuzz, or FUZZ_INSTALL=1); targets built and regressions replayed only"
    exit 0
  fi
fi

cargo run --quiet --manifest-path "$manifest" --example seed_corpus -- fuzz/corpus
for target in $targets; do
  echo "fuzz: $target for ${seconds}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done
echo "fuzz: $(wc -w <<<"$targets") target(s) fuzzed for ${seconds}s each, nothing found"
