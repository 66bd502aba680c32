#!/usr/bin/env bash
# Builds the fuzz targets and runs each in turn from its committed seeds, printing each
# target's executions. See fuzz/README.md.
#
#   bash fuzz/run.sh                     every target for 30 s (what CI runs)
#   bash fuzz/run.sh 3600 router sse     the router and SSE targets for an hour each
#   FUZZ_RUNS=10000000 bash fuzz/run.sh  every target for 10 million executions
#
# FUZZ_TARGET_DIR sets the build folder (default fuzz/target; never the main one: these
# builds carry coverage instrumentation). A crash stops the run with libFuzzer's report;
# the input is saved in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(tokens cursors_memory cursors_dynamo sse router ids dynamo_items redactor http1)
fi
target_dir=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}

# cargo-fuzz passes nightly-only -Z flags to rustc; the stable toolchain takes them with
# RUSTC_BOOTSTRAP=1. No sanitizer: cmz forbids unsafe code, so AddressSanitizer would find
# little and halve the speed; panics, overflow (debug assertions are on) and the targets'
# own assertions are the findings.
fuzz=(env RUSTC_BOOTSTRAP=1 CARGO_TERM_QUIET=true cargo fuzz)
flags=(--fuzz-dir fuzz --sanitizer none --target-dir "$target_dir")

start=$(date +%s)
"${fuzz[@]}" build "${flags[@]}"
echo "fuzz targets built in $(( $(date +%s) - start ))s"

for target in "${targets[@]}"; do
    corpus=fuzz/corpus/$target
    mkdir -p "$corpus" "fuzz/artifacts/$target"
    limit=(-max_total_time="$seconds")
    if [ -n "${FUZZ_RUNS:-}" ]; then
        limit=(-runs="$FUZZ_RUNS")
    fi
    options=()
    case $target in
    # Ids are at most 272 bytes; longer inputs only test the length check.
    ids) options=(-max_len=512) ;;
    # Bodies cut into 1-byte chunks are slow to parse; 2 KB holds several events.
    sse) options=(-max_len=2048) ;;
    esac
    if [ -f "fuzz/dicts/$target.dict" ]; then
        options+=(-dict="fuzz/dicts/$target.dict")
    fi
    log=$(mktemp)
    start=$(date +%s)
    # New inputs go to the first folder (git-ignored); the seeds are only read.
    if ! "${fuzz[@]}" run "${flags[@]}" "$target" "$corpus" "fuzz/seeds/$target" -- \
        "${limit[@]}" "${options[@]}" -print_final_stats=1 \
        -timeout=10 -rss_limit_mb=4096 > "$log" 2>&1; then
        tail -n 60 "$log" >&2
        rm -f "$log"
        echo "fuzz target ${target}: FAILED (input in fuzz/artifacts/${target}/)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    coverage=$(grep -E '^#[0-9]+\s+(DONE|INITED)' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
    rm -f "$log"
    echo "fuzz target ${target}: ${runs:-?} executions in $(( $(date +%s) - start ))s, ${coverage:-no coverage line}"
done
