#!/usr/bin/env bash
# The one test command (README): install molf with its test dependencies, check lint,
# format, clippy and the type stub, then run the Rust tests and the Python tests. Fails on
# any finding of a check, when any test fails, or when none ran (pytest exits 5 on
# "no tests collected"). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"

# Checks (configuration: [tool.ruff] in pyproject.toml; research/ and fuzz/ are excluded).
python3 -m ruff check
python3 -m ruff format --check
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The bindings are behind the `python` feature (what maturin builds): lint them too.
cargo clippy --workspace --all-targets --features python -- -D warnings
# The hand-written python/molf/_core.pyi against the compiled module.
python3 -m mypy.stubtest molf._core --allowlist scripts/stubtest-allowlist.txt

cargo test --workspace
python3 -m pytest -q "$@"
