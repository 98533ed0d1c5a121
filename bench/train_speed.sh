#!/usr/bin/env bash
# Training speed, side by side on this machine, one thread each: the trainer
# (tch) against the same model in Python (torch 2.13 + torchdiffeq 0.2.5),
# both starting from the same weights. Installs the Python side into
# ~/.cache/ffjord/venv-bench once (about 5 GB). Not part of the test suite.
# Usage: bench/train_speed.sh [iterations] [rounds]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
iterations=${1:-20}
rounds=${2:-2}
venv="${FFJORD_CACHE:-$HOME/.cache/ffjord}/venv-bench"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, torchdiffeq' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0 torchdiffeq==0.2.5
fi
# shellcheck source=../scripts/libtorch.sh
source "$root/scripts/libtorch.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cargo bench --quiet -p ffjord-trainer --bench train_step --manifest-path "$root/Cargo.toml" --no-run 2>/dev/null
init=$(mktemp --suffix .json)
out=$(mktemp)
for gradient in adjoint backprop; do
  for r in $(seq "$rounds"); do
    cargo bench --quiet -p ffjord-trainer --bench train_step --manifest-path "$root/Cargo.toml" -- \
      --gradient "$gradient" --iterations "$iterations" --init-json "$init" | tail -1 >>"$out"
    "$venv/bin/python" "$root/bench/ffjord_torch.py" "$init" --gradient "$gradient" --iterations "$iterations" >>"$out"
  done
done
python3 - "$out" <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
agg = collections.OrderedDict()
for r in rows:
    a = agg.setdefault((r["gradient"], r["impl"]), [])
    a.append(r)
print("| gradient | implementation | s/iter (wall) | s/iter (CPU) | NFE fwd | NFE bwd | ms per NFE (CPU) |")
print("|---|---|---|---|---|---|---|")
mean = lambda xs: sum(xs) / len(xs)
by_grad = collections.defaultdict(dict)
for (g, impl), rs in agg.items():
    w, c = mean([r["wall_s_per_iter"] for r in rs]), mean([r["cpu_s_per_iter"] for r in rs])
    nf, nb = mean([r["nfe_forward"] for r in rs]), mean([r["nfe_backward"] for r in rs])
    by_grad[g][impl] = c
    print(f"| {g} | {impl} | {w:.4f} | {c:.4f} | {nf:.1f} | {nb:.1f} | {1000 * c / (nf + nb):.2f} |")
for g, d in by_grad.items():
    (rust,) = [v for k, v in d.items() if "tch" in k]
    (py,) = [v for k, v in d.items() if "torchdiffeq" in k]
    print(f"\n{g}: the trainer is {py / rust:.2f}x the speed of torch+torchdiffeq per iteration (CPU time)")
PY
# Raw records for scripts/bench.
if [ -n "${BENCH_OUT:-}" ]; then grep '^{' "$out" >>"$BENCH_OUT"; fi
rm -f "$init" "$out"
