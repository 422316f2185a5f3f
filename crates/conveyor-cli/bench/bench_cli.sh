#!/usr/bin/env bash
# Side-by-side throughput of `conveyor send` (strict, keyed:16) against a shell loop of curl and a
# Python `requests` loop, all posting the same JSON lines to one local server with no added
# latency. Prints a Markdown table of items/s and ratios.
#
#   bash crates/conveyor-cli/bench/bench_cli.sh [LINES] [BASELINE_LINES]
#
# LINES (default 20000) go through conveyor; BASELINE_LINES (default 1000) through the curl and
# Python loops, which are far slower (their rates are per item, so the sizes need not match).
set -euo pipefail

LINES=${1:-20000}
BASELINE_LINES=${2:-1000}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d)
VENV=${CONVEYOR_BENCH_VENV:-${TMPDIR:-/tmp}/conveyor-bench-venv}
SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v curl >/dev/null || { echo "curl is missing: apt-get install -y curl" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet requests
fi

cd "$ROOT"
cargo build --quiet --release -p conveyor-cli --bin conveyor --example serve
CONVEYOR=$TARGET_DIR/release/conveyor
"$TARGET_DIR/release/examples/serve" 127.0.0.1:0 0 >"$WORK/url" 2>/dev/null &
SERVER_PID=$!
for _ in $(seq 100); do [ -s "$WORK/url" ] && break; sleep 0.05; done
URL=$(head -n1 "$WORK/url")

python3 - "$WORK" "$LINES" "$BASELINE_LINES" <<'PY'
import json, sys
work, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for name, count in (("lines.jsonl", n), ("baseline.jsonl", m)):
    with open(f"{work}/{name}", "w") as f:
        for i in range(count):
            f.write(json.dumps({"id": i, "user": f"user-{i % 64}", "text": f"event number {i}"}) + "\n")
PY

now() { date +%s.%N; }
rate() { python3 -c "import sys; print(f'{int(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2])):.0f}')" "$@"; }

t0=$(now); "$CONVEYOR" send "$WORK/lines.jsonl" --to "$URL" --no-journal --quiet; t1=$(now)
STRICT=$(rate "$LINES" "$t0" "$t1")
t0=$(now); "$CONVEYOR" send "$WORK/lines.jsonl" --to "$URL" --no-journal --quiet --ordering keyed:16 --key user; t1=$(now)
KEYED=$(rate "$LINES" "$t0" "$t1")
# The default: every line journaled (SQLite, 5 ms commit window) before and after delivery.
t0=$(now); "$CONVEYOR" send "$WORK/lines.jsonl" --to "$URL" --quiet --journal "$WORK/strict.journal"; t1=$(now)
STRICT_J=$(rate "$LINES" "$t0" "$t1")
t0=$(now); "$CONVEYOR" send "$WORK/lines.jsonl" --to "$URL" --quiet --journal "$WORK/keyed.journal" --ordering keyed:16 --key user; t1=$(now)
KEYED_J=$(rate "$LINES" "$t0" "$t1")
t0=$(now)
while IFS= read -r line; do
  curl -sS -o /dev/null -X POST -H 'Content-Type: application/json' --data-binary "$line" "$URL"
done <"$WORK/baseline.jsonl"
t1=$(now)
CURL=$(rate "$BASELINE_LINES" "$t0" "$t1")
t0=$(now)
"$VENV/bin/python" - "$URL" "$WORK/baseline.jsonl" <<'PY'
import sys, requests
url, path = sys.argv[1], sys.argv[2]
with requests.Session() as s, open(path) as f:
    for line in f:
        s.post(url, data=line.rstrip("\n"), headers={"Content-Type": "application/json"}).raise_for_status()
PY
t1=$(now)
PYTHON=$(rate "$BASELINE_LINES" "$t0" "$t1")

ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.1f}x')" "$1" "$2"; }
echo "| sender | items/s | vs curl loop | vs Python requests |"
echo "|---|---:|---:|---:|"
echo "| conveyor send (strict, --no-journal, $LINES lines) | $STRICT | $(ratio "$STRICT" "$CURL") | $(ratio "$STRICT" "$PYTHON") |"
echo "| conveyor send (keyed:16, --no-journal, $LINES lines) | $KEYED | $(ratio "$KEYED" "$CURL") | $(ratio "$KEYED" "$PYTHON") |"
echo "| conveyor send (strict, journal, $LINES lines) | $STRICT_J | $(ratio "$STRICT_J" "$CURL") | $(ratio "$STRICT_J" "$PYTHON") |"
echo "| conveyor send (keyed:16, journal, $LINES lines) | $KEYED_J | $(ratio "$KEYED_J" "$CURL") | $(ratio "$KEYED_J" "$PYTHON") |"
echo "| shell loop of curl ($BASELINE_LINES lines) | $CURL | 1.0x | $(ratio "$CURL" "$PYTHON") |"
echo "| Python requests.Session loop ($BASELINE_LINES lines) | $PYTHON | $(ratio "$PYTHON" "$CURL") | 1.0x |"
