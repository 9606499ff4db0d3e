#!/usr/bin/env bash
# `make bench`: the registrations benchmark for both set-ups at 1,000 and 10,000 workers, each
# held for 2 minutes with heartbeats. Figures go to stdout; docs/performance.md records them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
HOLD=${HOLD:-120}
for setup in default production; do
  for workers in 1000 10000; do
    "$PY" bench/registrations.py --setup "$setup" --workers "$workers" --hold "$HOLD"
  done
done
