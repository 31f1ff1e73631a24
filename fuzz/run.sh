#!/usr/bin/env bash
# Runs every fuzz target for a fixed budget and prints one JSON line per target:
#   {"bench":"fuzz","target":...,"seconds":...,"execs":...,"crashes":...,"exit":...}
# Usage: bash fuzz/run.sh [SECONDS_EACH] [TARGET...]   (default 600 s, all targets)
# Not part of the test suite: a benchmark-style command. Needs the nightly
# toolchain (`rustup toolchain install nightly`) and cargo-fuzz (installed here
# if missing). Crashes land in fuzz/artifacts/<target>/; fix each one and add
# its input as a regression test next to the parser it broke.
set -euo pipefail
cd "$(dirname "$0")"
budget=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(migration_stream saved_state control_request apiserver_request virtio_queue virtio_blk virtio_net virtio_mmio port_io acpi_registers)
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz/run.sh: needs the nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
cargo +nightly fuzz build -O >&2
python3 seeds.py corpus >&2
for t in "${targets[@]}"; do
  log=$(mktemp)
  status=0
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$budget" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
    >"$log" 2>&1 || status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
  [ "$status" -eq 0 ] || tail -40 "$log" >&2
  rm -f "$log"
  echo "{\"bench\":\"fuzz\",\"target\":\"$t\",\"seconds\":$budget,\"execs\":${execs:-0},\"crashes\":$crashes,\"exit\":$status}"
done
