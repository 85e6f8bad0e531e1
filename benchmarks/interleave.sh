#!/usr/bin/env bash
# Before/after on a shared machine: dispatch (100k tasks) and ingest (1M) on several checkouts, each
# with its own .venv, interleaved, the order rotated (and reversed every other round) so that a slow
# minute falls on all of them alike.
#   benchmarks/interleave.sh ROUNDS CHECKOUT [CHECKOUT ...]
#   e.g. git worktree add --detach ../before 2f1196d && (cd ../before && python3 -m venv .venv &&
#        .venv/bin/pip install -e '.[dev]') && benchmarks/interleave.sh 5 ../before .
set -u
rounds=${1:?rounds}; shift
sides=("$@")
n=${#sides[@]}
for i in $(seq 1 "$rounds"); do
  k=$(( (i - 1) % n )); order=("${sides[@]:$k}" "${sides[@]:0:$k}")
  if (( i % 2 == 0 )); then order=($(printf '%s\n' "${order[@]}" | tac)); fi
  for side in "${order[@]}"; do
    echo "round $i $side dispatch: $(cd "$side" && .venv/bin/python benchmarks/dispatch.py --tasks 100000 2>&1 | grep 'dispatched end to end')"
  done
  for side in "${order[@]}"; do
    echo "round $i $side ingest: $(cd "$side" && .venv/bin/python benchmarks/ingest.py 2>&1 | grep 'ingested')"
  done
done
