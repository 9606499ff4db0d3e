#!/usr/bin/env bash
# `make bench`: the whole registration flow against the service, the FastAPI baseline and the
# bare-Channels floor, for both set-ups at 2,000 and 10,000 workers, three rounds each (medians and
# ratios printed); then the service alone at 10,000 (production set-up) held for HOLD seconds with
# heartbeats and disconnected at once. Figures go to stdout; docs/performance.md records them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
HOLD=${HOLD:-120}
ROUNDS=${ROUNDS:-3}
for setup in default production; do
  for workers in 2000 10000; do
    "$PY" bench/registrations.py --setup "$setup" --workers "$workers" --repeat "$ROUNDS"
  done
done
"$PY" bench/registrations.py --setup production --workers 10000 --targets service \
  --extended --hold "$HOLD"
