#!/usr/bin/env bash
# Solver budget of every shipped model: `trainer budget` picks the cheapest
# runtime solver whose log p stays within EPS nats of Dopri5 1e-7 on 1,000
# selection rows, then reports that solver's max and mean error and NFE on
# 1,000 test rows. Selection rows: the toy distribution (seed 5) for the 2-D
# models, the first 1,000 rows of the prepared train split for real data (the
# models' validation rows are a held-out part of it); test rows: fresh toy
# rows (seed 6) or the prepared test split (normal rows and anomalies).
# Fetches and prepares the data sets with scripts/fetch-data (cached).
# Usage: bench/solver_budget.sh [EPS]   (default 0.01)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eps=${1:-0.01}
data="${FFJORD_CACHE:-$HOME/.cache/ffjord}/prepared"
mkdir -p "$data"
prepare() { # name → prepared folder
  if [ ! -f "$data/$1/test.csv" ] && [ ! -f "$data/$1/test.npy" ]; then
    scripts/trainer prepare "$1" --raw "$(scripts/fetch-data "$1")" --out-dir "$data/$1" >&2
  fi
}
budget() { # model, then the data arguments
  local model=$1
  shift
  scripts/trainer budget --model "models/$model/model.ffjd" --max-error "$eps" "$@" | sed -n 's/^chosen: //p'
}
echo "| model | D | chosen default (ε = $eps nats) | test max error | test mean error | NFE | FLOPs per log p |"
echo "|---|---|---|---|---|---|---|"
row() { # model, chosen line
  local dim
  dim=$(scripts/trainer inspect "models/$1/model.ffjd" | sed -n 's/^dimension *//p')
  python3 - "$1" "$dim" "$2" <<'PY'
import re, sys
model, dim, line = sys.argv[1:4]
solver = line.split(" (cheapest")[0]
get = lambda k: re.search(k + r" ([0-9.e+-]+)", line).group(1)
print(f"| {model} | {dim} | {solver} | {float(get('max error')):.1e} | {float(get('mean error')):.1e} | "
      f"{float(get('mean NFE')):.1f} | {int(line.split(', ')[-1].split()[0]):,} |")
PY
}
for m in 8gaussians 8gaussians-mcu; do
  row "$m" "$(budget "$m" --toy 8gaussians --n 1000 --seed 5)"
done
for m in shuttle satellite cardio; do
  prepare "$m"
  row "$m" "$(budget "$m" --data "$data/$m/train.csv" --test "$data/$m/test.csv" --test-labels anomaly)"
done
prepare power
row power "$(budget power --data "$data/power/valid.npy" --test "$data/power/test.npy")"
