#!/usr/bin/env bash
# The one test command (README): install molf with its test dependencies, then
# run the Rust tests and the Python tests. Fails when any test fails or none ran
# (pytest exits 5 on "no tests collected"). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
cargo test --workspace
python3 -m pytest -q "$@"
