#!/usr/bin/env bash
# Usage: fuzz/run.sh SECONDS [TARGET…]
#
# Runs each cargo-fuzz target (default: all) for SECONDS, starting from the
# committed seeds in fuzz/seeds/TARGET; the growing corpus and any crash
# artefacts go to fuzz/corpus/ and fuzz/artifacts/ (not committed).
# Uses stable Rust with RUSTC_BOOTSTRAP (cargo fuzz needs -Z flags) and no
# sanitizer: the code is safe Rust, so what the fuzzer hunts is panics,
# arithmetic overflow (debug assertions are on) and hangs.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET…]}
shift
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(frame inspect)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# A short run (make test's 10 s) is a smoke test: an unoptimised build
# compiles in far less time than the fuzzing it would speed up. Long runs
# (make fuzz) are optimised.
build=(--release)
if (( seconds <= 60 )); then
    build=(--dev)
fi
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    log=$(mktemp)
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "${build[@]}" --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        grep -E 'panicked|SUMMARY|Test unit written|error' "$log" >&2 || tail -20 "$log" >&2
        echo "fuzz: $target found a failing input; see fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E '^stat::(number_of_executed_units|new_units_added)' "$log"
    rm -f "$log"
done
