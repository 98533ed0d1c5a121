#!/usr/bin/env bash
# The anomaly-detection yardstick: for each labelled set and split seed 0, 1, 2,
# `trainer prepare` (ODDS protocol), `trainer fit` (the recipe below, one
# thread) and `trainer benchmark` (FFJORD next to a Gaussian, a Gaussian
# mixture, an isolation forest, LOF and a KDE on the same split), then the
# mean ± sd table per set. Not part of the tests (about 30 minutes on 2 cores).
# Usage: bench/anomaly.sh OUT_DIR [SETS...]   (default sets: cardio satellite shuttle;
# also breastw and arrhythmia, which have no recipe and get fit's plain defaults)
# The fits use the trainer's defaults besides the recipe: each trains on
# N(0, I) and on a kernel base and keeps the file with the better validation
# NLL (`--train-base auto`; FIT_ARGS="--train-base normal" trains one), and an
# N(0, I) file ends in a latent KDE base where cross-validated validation
# likelihood prefers it (`--base auto`); FIT_ARGS="--base normal" keeps N(0, I).
# FIT_ARGS="--whiten false" bench/anomaly.sh …  adds flags to every fit (an ablation);
# RECIPES=0 fits every set with fit's plain defaults (what a user gets without flags);
# SEEDS="0" limits the split seeds; MEMBERS=3 benchmarks an ensemble of three
# flows per split (fit seeds s, s+1000, s+2000) instead of one.
# REUSE_FITS=1 keeps the trained runs already in OUT_DIR and only re-exports
# them with the current trainer (EXPORT_ARGS="--score density" adds export
# flags), then benchmarks: a change to export or scoring measured on the same
# fits in minutes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out=${1:?usage: bench/anomaly.sh OUT_DIR [SETS...]}
shift
sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(cardio satellite shuttle)
trainer="${TRAINER:-$root/scripts/trainer}"   # TRAINER=path: a fixed binary (e.g. while the tree is being edited)
"$trainer" --version >/dev/null   # builds once
mkdir -p "$out"
recipe() {
  [ "${RECIPES:-1}" = 0 ] && return 0
  case "$1" in
    cardio|satellite) echo --hidden 64,64 --trace gaussian --iterations 1500 --valid-every 100 --patience 5 --batch 256 ;;
    shuttle) echo --hidden 32,32,32 --trace gaussian --iterations 2000 --valid-every 250 --patience 5 --batch 512 ;;
    *) echo "" ;;   # breastw, arrhythmia: never tuned on, so fit's plain defaults
  esac
}
# The recipe's flags without those FIT_ARGS sets again (a flag may be given once).
with_overrides() {
  local out=() skip=0 a
  for a in "$@"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    if [[ "$a" == --* ]] && [[ " ${FIT_ARGS:-} " == *" $a "* ]]; then skip=1; continue; fi
    out+=("$a")
  done
  echo "${out[@]}"
}
for set in "${sets[@]}"; do
  raw=$("$root/scripts/fetch-data" "$set")
  for seed in ${SEEDS:-0 1 2}; do
    d="$out/$set/seed$seed"
    "$trainer" prepare "$set" --raw "$raw" --out-dir "$d/data" --seed "$seed"
    TIMEFORMAT="%U s CPU, %R s wall"
    # Member 0 is the single model (fit seed = split seed); MEMBERS=K adds K − 1
    # flows with other fit seeds on the same split, benchmarked as an ensemble.
    models=()
    for m in $(seq 0 $(( ${MEMBERS:-1} - 1 ))); do
      suffix=$([ "$m" = 0 ] && echo "" || echo "-$m")
      if [ "${REUSE_FITS:-0}" = 1 ] && [ -f "$d/model$suffix.run/best.ot" ]; then
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=1 "$trainer" export --run-dir "$d/model$suffix.run" --out "$d/model$suffix.ffjd" \
          ${EXPORT_ARGS:-} > "$d/export$suffix.log" 2>&1
        models+=(--model "$d/model$suffix.ffjd")
        continue
      fi
      # shellcheck disable=SC2046,SC2086
      { time OMP_NUM_THREADS=1 "$trainer" fit --data "$d/data/train.csv" --valid-data "$d/data/valid.csv" \
        --out "$d/model$suffix.ffjd" --seed $(( seed + 1000 * m )) $(with_overrides $(recipe "$set")) ${FIT_ARGS:-} \
        > "$d/fit$suffix.log" 2>&1; } 2> "$d/fit-time$suffix.txt"
      models+=(--model "$d/model$suffix.ffjd")
    done
    "$trainer" benchmark --run-dir "$d/model.run" "${models[@]}" --test "$d/data/test.csv" \
      --json "$d/benchmark.json" > "$d/benchmark.md"
    echo "$set seed $seed: $(grep "FFJORD (this model)" "$d/benchmark.md" | cut -d'|' -f3) AUROC; fit $(cat "$d/fit-time.txt" 2>/dev/null) score: $("$trainer" inspect "$d/model.ffjd" | sed -n 's/^score *\([a-z-]*\).*/\1/p')$(sed -n 's/^chosen: train base \(.*\) (validation.*/; train base \1/p' "$d/fit.log" 2>/dev/null || true)"
  done
  echo "## $set"
  "$trainer" benchmark-summary "$out/$set"/seed*/benchmark.json | tee "$out/$set/summary.md"
done
