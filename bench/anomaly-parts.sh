#!/usr/bin/env bash
# The parts of the flow's anomaly score on the runs of `bench/anomaly.sh OUT`:
# for each set and split seed, the run re-exported on an N(0, I) base
# (`normal.ffjd`, so `log_p_base` is log N(z)), scored on its test rows and on
# synthetic outliers made from its validation rows (bench/synthetic-outliers.py),
# then bench/score-parts.py on both: AUROC of −log p, of the latent radius
# −log N(z), of the volume change Δ, and of the two mixed.
# Usage: bench/anomaly-parts.sh OUT [SETS...]   (default: the sets under OUT)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out=${1:?usage: bench/anomaly-parts.sh OUT [SETS...]}
shift
sets=("$@")
[ ${#sets[@]} -gt 0 ] || mapfile -t sets < <(find "$out" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort)
trainer="${TRAINER:-$root/scripts/trainer}"
test_scores=() synthetic_scores=()
for set in "${sets[@]}"; do
  for d in "$out/$set"/seed*; do
    [ -d "$d/model.run" ] || continue
    "$trainer" export --run-dir "$d/model.run" --base normal --out "$d/normal.ffjd" > /dev/null
    OMP_NUM_THREADS=1 "$trainer" score --model "$d/normal.ffjd" --data "$d/data/test.csv" --label anomaly \
      --out "$d/parts-test.csv" 2> /dev/null
    "$root/bench/synthetic-outliers.py" "$d/data" > "$d/synthetic.csv"
    OMP_NUM_THREADS=1 "$trainer" score --model "$d/normal.ffjd" --data "$d/synthetic.csv" --label anomaly \
      --out "$d/parts-synthetic.csv" 2> /dev/null
    test_scores+=("$d/parts-test.csv")
    synthetic_scores+=("$d/parts-synthetic.csv")
  done
done
echo "## test rows (real outliers)"
"$root/bench/score-parts.py" "${test_scores[@]}"
echo
echo "## validation rows against synthetic outliers (no test row used)"
"$root/bench/score-parts.py" "${synthetic_scores[@]}"
