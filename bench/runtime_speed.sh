#!/usr/bin/env bash
# Inference speed side by side, one thread each: ffjord-runtime against the same
# model in torch + torchdiffeq (exact trace, dopri5 at the same tolerance), on
# rows sampled from the model. Uses the Python venv of train_speed.sh.
# Usage: bench/runtime_speed.sh [MODEL] [ROWS] [TOL]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model=${1:-$root/models/8gaussians-mcu/model.ffjd}
n=${2:-10000}
tol=${3:-1e-5}
venv="${FFJORD_CACHE:-$HOME/.cache/ffjord}/venv-bench"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, torchdiffeq' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0 torchdiffeq==0.2.5
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$root/scripts/trainer" inspect "$model" --json "$tmp/model.json" >/dev/null
"$root/scripts/trainer" sample --model "$model" --n "$n" --seed 1 --out "$tmp/rows.csv"
rust=$(cargo bench --quiet -p ffjord-runtime --bench model_file --manifest-path "$root/Cargo.toml" -- "$model" "$tmp/rows.csv" "$tol" | tail -1)
py=$("$venv/bin/python" "$root/bench/runtime_torch.py" "$tmp/model.json" "$tmp/rows.csv" "$tol")
python3 - "$rust" "$py" <<'PY'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"| implementation | µs per row, one at a time | rows/s over {r['rows']} rows |")
print("|---|---|---|")
for x in (r, p):
    print(f"| {x['impl']} | {x['single_us']:.1f} | {x['rows_per_s']:.0f} |")
print(f"\nsingle row: the runtime is {p['single_us'] / r['single_us']:.1f}x faster; "
      f"{r['rows']} rows: {r['rows_per_s'] / p['rows_per_s']:.2f}x the throughput (mean NFE per row {r['mean_nfe']})")
PY
