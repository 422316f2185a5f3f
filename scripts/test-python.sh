#!/usr/bin/env bash
# Build the `conveyor` Python package into a local venv and run its pytest suite.
#
# Works on a fresh clone with no manual steps: it creates `.venv` at the repo root if missing,
# installs pinned build/test tools, builds the extension in release mode and installs it into the
# venv, then runs the tests and the type-stub check. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Pinned so a new release of a tool cannot break CI overnight.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "maturin==1.9.6" "pytest==8.4.2" "pytest-timeout==2.4.0" "mypy==1.18.2"

# `maturin develop` installs into the active venv; activating keeps it away from the system Python.
# shellcheck disable=SC1091
source "$VENV/bin/activate"
maturin develop --release --quiet --manifest-path crates/conveyor-python/Cargo.toml

# The stubs must describe the real module: stubtest imports it and compares signatures.
python -m mypy.stubtest conveyor --allowlist crates/conveyor-python/stubtest-allowlist.txt
python -m mypy --strict crates/conveyor-python/tests/typing_usage.py

python -m pytest crates/conveyor-python/tests "$@"
