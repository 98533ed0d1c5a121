#!/usr/bin/env bash
# Smaller weights, measured on every shipped model: `trainer convert` stores
# the CNF matrices as f16 and as i8, then the runtime scores the same rows
# with each file. Prints one table row per model and encoding: file size,
# weight bytes, |Δ log p| against the f32 file (max and mean, nats) and, for
# the anomaly models, AUROC and the stored threshold's false-positive rate on
# the split-seed-0 test rows (labels never used for anything else). The
# threshold is kept from the f32 file. Not part of the tests (a few minutes).
# Usage: bench/quantize.sh OUT_DIR
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out=${1:?usage: bench/quantize.sh OUT_DIR}
trainer="${TRAINER:-$root/scripts/trainer}"
"$trainer" --version >/dev/null
mkdir -p "$out"

# Rows per model: the anomaly sets' test split (seed 0); the toy and POWER models
# 2,000 rows of their data.
rows() {
  case "$1" in
    shuttle|satellite|cardio)
      [ -f "$out/data/$1/test.csv" ] ||
        "$trainer" prepare "$1" --raw "$("$root/scripts/fetch-data" "$1")" --seed 0 --out-dir "$out/data/$1" >/dev/null
      echo --data "$out/data/$1/test.csv" --label anomaly ;;
    8gaussians|8gaussians-mcu) echo --toy 8gaussians --n 2000 --seed 1 ;;
    power)
      [ -f "$out/data/power-test.csv" ] ||
        python3 - "$root/data/power/test.npy" "$out/data/power-test.csv" <<'EOF'
import sys, struct, ast
raw = open(sys.argv[1], "rb").read()
hlen = struct.unpack("<H", raw[8:10])[0]
hdr = ast.literal_eval(raw[10:10 + hlen].decode())
n, d = hdr["shape"]
size = 8 if hdr["descr"].endswith("8") else 4
fmt = "<" + ("d" if size == 8 else "f") * d
body = raw[10 + hlen:]
with open(sys.argv[2], "w") as f:
    f.write(",".join(f"x{j}" for j in range(d)) + "\n")
    for i in range(min(n, 2000)):
        f.write(",".join(repr(v) for v in struct.unpack_from(fmt, body, i * size * d)) + "\n")
EOF
      echo --data "$out/data/power-test.csv" ;;
  esac
}

echo "| model | weights | file bytes | weight bytes | max abs Δ log p | mean abs Δ log p | AUROC | FPR at stored threshold |"
echo "|---|---|---|---|---|---|---|---|"
for m in 8gaussians 8gaussians-mcu shuttle satellite cardio power; do
  src="$root/models/$m/model.ffjd"
  [ -f "$src" ] || continue
  read -r -a args <<<"$(rows "$m")"
  for enc in f32 f16 i8; do
    file="$out/$m.$enc.ffjd"
    if [ "$enc" = f32 ]; then cp "$src" "$file"; else "$trainer" convert "$src" --weights "$enc" --out "$file" >/dev/null; fi
    "$trainer" score --model "$file" "${args[@]}" --out "$out/$m.$enc.csv" >"$out/$m.$enc.txt" 2>&1
    wbytes=$("$trainer" inspect "$file" | sed -n 's/^parameters .*(\([0-9]*\) bytes of weights)/\1/p')
    python3 - "$out/$m.f32.csv" "$out/$m.$enc.csv" "$out/$m.$enc.txt" "$m" "$enc" "$(stat -c %s "$file")" "$wbytes" <<'EOF'
import csv, re, sys
ref, cur, txt, model, enc, size, wbytes = sys.argv[1:]
def logp(path):
    with open(path) as f:
        return [float(r["log_p"]) for r in csv.DictReader(f)]
a, b = logp(ref), logp(cur)
d = [abs(x - y) for x, y in zip(a, b)]
text = open(txt).read()
auroc = re.search(r"AUROC\s*[:=]?\s*([0-9.]+)", text)
fpr = re.search(r"false[- ]positive rate[ :=]*([0-9.]+)", text)
print(f"| {model} | {enc} | {size} | {wbytes} | {max(d):.2e} | {sum(d)/len(d):.2e} | "
      f"{auroc.group(1) if auroc else '—'} | {fpr.group(1) if fpr else '—'} |")
EOF
  done
done
