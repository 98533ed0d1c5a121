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
bench() { cargo bench --quiet -p ffjord-runtime --bench model_file --manifest-path "$root/Cargo.toml" "$@" -- "$model" "$tmp/rows.csv" "$tol" "$tmp/ref.csv" | tail -1; }
# The portable build (x86-64 baseline: SSE2) and one for this CPU (AVX2 where present).
rust=$(bench)
native=$(RUSTFLAGS="-C target-cpu=native" bench --target-dir "$root/target/native")
py=$("$venv/bin/python" "$root/bench/runtime_torch.py" "$tmp/model.json" "$tmp/rows.csv" "$tol" "$tmp/ref.csv")
if [ -n "${BENCH_OUT:-}" ]; then printf '%s\n%s\n%s\n' "$rust" "$native" "$py" >>"$BENCH_OUT"; fi
python3 - "$rust" "$native" "$py" <<'PY'
import json, sys
rs, p = [json.loads(a) for a in sys.argv[1:-1]], json.loads(sys.argv[-1])
print(f"| implementation | path | rows/s (wall) | rows/s (CPU) | NFE per row | GFLOP/s (CPU) | max error vs Dopri5 1e-7 (nats) |")
print("|---|---|---|---|---|---|---|")
for r in rs:
    for x in r["paths"]:
        print(f"| {r['impl']} | {x['path']} | {x['rows_per_s']:.0f} | {x['rows_per_cpu_s']:.0f} | {x['mean_nfe']:.1f} | {x['gflops_cpu']:.2f} | {x['max_abs_err']:.1e} |")
print(f"| {p['impl']} | one batch, shared steps | {p['rows_per_s']:.0f} | {p['rows_per_cpu_s']:.0f} | {p['batch_nfe']} | | {p['max_abs_err']:.1e} |")
for r in rs:
    best = max(r["paths"], key=lambda x: x["rows_per_cpu_s"])
    print(f"\n{r['impl']}: one row {r['single_us']:.1f} µs vs torch {p['single_us']:.1f} µs ({p['single_us'] / r['single_us']:.0f}x); "
          f"{r['rows']} rows: {best['path']} {best['rows_per_cpu_s'] / p['rows_per_cpu_s']:.2f}x torch's throughput (CPU time); "
          f"{best['gflops_cpu']:.1f} GFLOP/s = {100 * best['gflops_cpu'] / r['ceiling_gflops']:.0f}% of this build's "
          f"{r['ceiling_gflops']:.1f} GFLOP/s multiply-add ceiling ({r['flops_per_nfe']} FLOPs per NFE)")
PY
