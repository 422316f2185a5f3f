#!/usr/bin/env bash
# Every check and test of the project: what CI runs (.ci/run calls this).
# Installs what it needs itself: Rust components via rustup when missing, Python
# packages into ./.venv (see scripts/test-python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    step "installing rust component $component"
    rustup component add "$component"
  fi
done

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc --workspace --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

step "cargo test --workspace"
cargo test --workspace

if [ -f scripts/test-python.sh ]; then
  step "python package tests"
  bash scripts/test-python.sh
fi
