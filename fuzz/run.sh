#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 30) from its seeds; exits non-zero
# on the first crash, leaving the input in fuzz/artifacts/<target>/. CI runs it briefly; a
# longer hunt: `fuzz/run.sh 3600` (or one target: `cargo +nightly fuzz run sink_segments`).
# Needs the nightly toolchain (libFuzzer) and cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
# No sanitizer by default: ferry's code is safe Rust, and the build is minutes shorter.
# FUZZ_SANITIZER=address for ASan.
san="${FUZZ_SANITIZER:-none}"
cargo +nightly fuzz build -s "$san"
# The sink target writes and fsyncs files on every run: on tmpfs where there is one.
scratch=$(mktemp -d "${FUZZ_SCRATCH:-$( [ -w /dev/shm ] && echo /dev/shm || echo /tmp )}/ferry-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
for t in $(cargo +nightly fuzz list); do
  corpus="$scratch/corpus-$t"
  mkdir -p "$corpus"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  echo "== fuzzing $t for ${secs}s"
  status=0
  TMPDIR="$scratch" cargo +nightly fuzz run -s "$san" "$t" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1 || status=$?
  # libFuzzer's chatter stays in the log; what it found, and its exit status, count.
  grep -E '^(Done|SUMMARY|stat::number_of_executed_units)|panicked|ERROR|Test unit written' "$scratch/$t.log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$scratch/$t.log" >&2
    echo "fuzz target $t failed (exit $status): the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
