#!/usr/bin/env bash
# Dispatch before/after on a shared machine: two checkouts (each with its own .venv), ROUNDS rounds,
# ABBA order (the side that runs first alternates, so a slow minute falls on both alike). One line per
# run: round, checkout, tasks/s, the daemon's CPU seconds, the load average.
#   benchmarks/abba.sh ROUNDS BEFORE AFTER [TASKS]
#   e.g. benchmarks/abba.sh 16 ../before-17 . 100000
set -u
rounds=${1:?rounds}; a=${2:?before}; b=${3:?after}; n=${4:-100000}
for i in $(seq 1 "$rounds"); do
  if (( i % 2 )); then order=("$a" "$b"); else order=("$b" "$a"); fi
  for side in "${order[@]}"; do
    out=$(cd "$side" && .venv/bin/python benchmarks/dispatch.py --tasks "$n" 2>&1)
    rate=$(grep -o "dispatched end to end: [0-9]* in [0-9.]* s = [0-9,]* tasks/s" <<<"$out" | sed 's/.*= //; s/,//g; s/ tasks.s//')
    cpu=$(grep -o "daemon: .*CPU [0-9.]* s" <<<"$out" | grep -o "CPU [0-9.]*" | cut -d' ' -f2)
    echo "$i $side ${rate:-failed} ${cpu:-?} $(cut -d' ' -f1 /proc/loadavg)"
  done
done
