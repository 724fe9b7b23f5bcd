#!/usr/bin/env bash
# Runs one fuzz target with coverage feedback on a *stable* toolchain (no ASan): the same
# SanitizerCoverage flags cargo-fuzz passes, which are all stable `-C` options.
# Usage: fuzz/run_stable.sh TARGET [libFuzzer args...], e.g.
#        fuzz/run_stable.sh route_scores -max_total_time=60
set -euo pipefail
cd "$(dirname "$0")"
target="$1"; shift
triple="$(rustc -vV | sed -n 's/^host: //p')"
# --target keeps these flags off build scripts and proc macros.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --target "$triple" --bin "$target"
mkdir -p "corpus/$target" artifacts
exec "target/$triple/release/$target" "corpus/$target" -artifact_prefix=artifacts/ "$@"
