#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets under fuzz/ (cargo fuzz, libFuzzer),
# each for SECONDS (default 60), starting from the committed seeds.
#
#   ./scripts/fuzz.sh            # every target, 60 s each
#   ./scripts/fuzz.sh 600 definition
#
# A crash stops the run; the input that caused it is written to
# fuzz/artifacts/<target>/ and printed. Replay it with
#   cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>
# and turn it into a unit test beside the code it broke.
#
# cargo fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP lets the
# stable toolchain accept them, and `-s none` builds without a sanitizer
# (the code is safe Rust: panics and hangs are what is looked for).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(event_decode definition cel_condition)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (once)" >&2
  cargo install cargo-fuzz --locked -q
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "--- fuzzing $target for ${seconds}s"
  if ! cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    grep -E -A12 "panicked|ERROR: libFuzzer" "$log" | head -40 >&2
    grep -E "Test unit written" "$log" >&2 || true
    echo "error: fuzz target $target failed" >&2
    exit 1
  fi
  grep -E "^#[0-9]+[[:space:]]+DONE" "$log" || tail -3 "$log"
done
