#!/usr/bin/env bash
# Builds the floor probe (a PyO3 `send` that does nothing but return a receipt object) and
# times it beside SimpleQueue + thread and conveyor itself: see floor.py.
#   bash crates/conveyor-python/bench/floor/run.sh [--n N] [--repeat K]
# Needs the package built into .venv first (scripts/test-python.sh does it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || { echo "no $python: run scripts/test-python.sh first" >&2; exit 2; }
target="$root/target/floor-probe"
cargo build --release --quiet --manifest-path "$here/Cargo.toml" --target-dir "$target"
module="$(mktemp -d)"
trap 'rm -rf "$module"' EXIT
cp "$target/release/lib_floor.so" "$module/_floor.abi3.so"
PYTHONPATH="$module:$here/.." "$python" "$here/floor.py" "$@"
