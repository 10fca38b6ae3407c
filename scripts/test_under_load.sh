#!/usr/bin/env bash
# Run the test suite N times in a row with a CPU hog beside it (issue 17: tests must not depend on
# timing or scheduling), and report each run's time and result.
#
#   scripts/test_under_load.sh [N] [pytest arguments...]
#
# N defaults to 3; the pytest arguments default to the whole suite (tests/). HOGS (default 1) is
# the number of busy-looping processes started beside the tests. Each run's output goes to
# $LOGDIR/run-K.log (LOGDIR defaults to a new temporary folder), its temporary files to a fresh
# $LOGDIR/tmp-K (pytest's own clean-up of earlier runs' folders is left out of the timing). The exit
# code is 0 only when every run passed.
#
# Examples:
#   scripts/test_under_load.sh                          # the whole suite, 3 times
#   scripts/test_under_load.sh 5 tests/faults/test_disk_full.py
#   HOGS=2 scripts/test_under_load.sh 3 tests/test_overlap.py -k write
set -u

runs=${1:-3}
shift $(( $# > 0 ? 1 : 0 ))
if [ $# -eq 0 ]; then
    set -- tests/
fi
case $runs in
    ''|*[!0-9]*) echo "N must be a whole number, not '$runs'" >&2; exit 2 ;;
esac
hogs=${HOGS:-1}
logdir=${LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/vqcli-under-load.XXXXXX")}
mkdir -p "$logdir"
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}

hog_pids=()
stop_hogs() {
    for pid in "${hog_pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
    wait "${hog_pids[@]}" 2>/dev/null
    hog_pids=()
}
trap 'stop_hogs; exit 130' INT TERM
trap stop_hogs EXIT

for _ in $(seq "$hogs"); do
    "$python" -c "while 1: pass" &
    hog_pids+=($!)
done
echo "$hogs CPU hog(s) running (pids ${hog_pids[*]}); $runs run(s) of: pytest $*; logs in $logdir"

failed=0
for k in $(seq "$runs"); do
    log="$logdir/run-$k.log"
    start=$(date +%s)
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pytest -q -p no:cacheprovider \
        --basetemp "$logdir/tmp-$k" "$@" >"$log" 2>&1
    code=$?
    seconds=$(( $(date +%s) - start ))
    summary=$(grep -E "(passed|failed|error)" "$log" | tail -n 1)
    if [ "$code" -eq 0 ]; then
        result=passed
    else
        result="FAILED (exit $code)"
        failed=$((failed + 1))
    fi
    printf 'run %d: %s in %d s: %s\n' "$k" "$result" "$seconds" "${summary:-no summary (see $log)}"
    if [ "$code" -ne 0 ]; then
        grep -E "^(FAILED|ERROR) " "$log" | sed 's/^/    /'
    fi
done

echo "$((runs - failed)) of $runs run(s) passed"
[ "$failed" -eq 0 ]
