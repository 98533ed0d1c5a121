#!/usr/bin/env bash
# RNODE (kinetic + Jacobian-Frobenius regularization) against no
# regularization: test NLL (data units, exact trace, from `fit`) and the
# runtime's Dopri5 1e-5 NFE per row on 1,000 rows, for 8gaussians, the
# shuttle training data and checkerboard (3x64 net). 3x32 concatsquash/tanh, Gaussian Hutchinson, batch
# 512, T = 1 fixed (RNODE's recipe) unless the row says "learned T" (FFJORD's
# default), 8,000 iterations per run on one thread: about 10 minutes a run on
# the 2-vCPU machine, two runs at a time.
# Usage: bench/rnode.sh [OUT_DIR]   (runs already in OUT_DIR are reused)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out=${1:-$root/target/rnode}
mkdir -p "$out"
cd "$root"
export OMP_NUM_THREADS=1
data="${FFJORD_CACHE:-$HOME/.cache/ffjord}/prepared"
if [ ! -f "$data/shuttle/train.csv" ]; then
  scripts/trainer prepare shuttle --raw "$(scripts/fetch-data shuttle)" --out-dir "$data/shuttle" >&2
fi
common="--hidden 32,32,32 --trace gaussian --iterations 8000 --valid-every 1000 --batch 512"
fixed="--end-time 1.0 --train-end-time false"
run() { # name, then fit arguments
  local name=$1
  shift
  [ -f "$out/$name.ffjd" ] || scripts/trainer fit "$@" --out "$out/$name.ffjd" --run-dir "$out/$name.run" >"$out/$name.log" 2>&1
}
toy() { run "toy-$1" --toy 8gaussians $common "${@:2}"; }
shuttle() { run "shuttle-$1" --data "$data/shuttle/train.csv" $common "${@:2}"; }
(toy plain-learned-T; toy l0 $fixed; toy l0.03 $fixed --kinetic 0.03 --jacobian 0.03; toy l0.2 $fixed --kinetic 0.2 --jacobian 0.2) &
(toy l0.01 $fixed --kinetic 0.01 --jacobian 0.01; toy l0.1 $fixed --kinetic 0.1 --jacobian 0.1; toy l0.5 $fixed --kinetic 0.5 --jacobian 0.5) &
wait
(shuttle l0 $fixed; shuttle l0.1 $fixed --kinetic 0.1 --jacobian 0.1) &
(shuttle l0.01 $fixed --kinetic 0.01 --jacobian 0.01) &
wait
# A harder toy with a wider net, 6,000 iterations.
board="--toy checkerboard --hidden 64,64,64 --trace gaussian --iterations 6000 --valid-every 1000 --batch 512"
(run checkerboard-l0 $board $fixed) &
(run checkerboard-l0.05 $board $fixed --kinetic 0.05 --jacobian 0.05) &
wait
# RNODE_LONG=1: the toy at λ = 0 and 0.1 for 24,000 iterations (about 45
# minutes more): does the unregularized NFE grow with longer training?
if [ "${RNODE_LONG:-0}" = 1 ]; then
  long="--toy 8gaussians --hidden 32,32,32 --trace gaussian --iterations 24000 --valid-every 2000 --batch 512"
  (run toy24k-l0 $long $fixed) &
  (run toy24k-l0.1 $long $fixed --kinetic 0.1 --jacobian 0.1) &
  wait
fi
# Evaluation rows: 1,000 toy draws, and the first 1,000 shuttle training rows.
[ -f "$out/toy-rows.csv" ] || scripts/trainer toy 8gaussians --n 1000 --seed 11 --out "$out/toy-rows.csv"
[ -f "$out/checkerboard-rows.csv" ] || scripts/trainer toy checkerboard --n 1000 --seed 11 --out "$out/checkerboard-rows.csv"
head -1001 "$data/shuttle/train.csv" >"$out/shuttle-rows.csv"
echo "| data | end time | λ (kinetic = Jacobian) | test NLL (nats) | runtime NFE per row (Dopri5 1e-5) |"
echo "|---|---|---|---|---|"
for f in "$out"/toy-*.ffjd "$out"/toy24k-*.ffjd "$out"/shuttle-*.ffjd "$out"/checkerboard-*.ffjd; do
  [ -f "$f" ] || continue
  name=$(basename "$f" .ffjd)
  set=${name%%-*}
  nll=$(sed -n 's/.*(\([0-9.-]*\) nats in data units).*/\1/p' "$out/$name.log" | tail -1)
  nfe=$(scripts/trainer score --model "$f" --data "$out/${set%24k}-rows.csv" --solver dopri5 --tol 1e-5 2>/dev/null |
    awk -F, 'NR > 1 { s += $5; n++ } END { printf "%.1f", s / n }')
  case "$name" in
    *learned-T) t="learned"; lambda=0 ;;
    *) t="T = 1"; lambda=${name##*-l} ;;
  esac
  echo "| $set | $t | $lambda | $nll | $nfe |"
done
