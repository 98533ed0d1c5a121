#!/usr/bin/env bash
# The Cortex-M4F table of trainer/README.md ("Smaller weights"): for every
# shipped model and weight encoding, the qemu-m4f scorer's flash, peak stack
# and executed instructions per log-density (rk4-8), with the host's golden
# values checked on the device for each. Models that do not fit the example's
# 64 KiB / 16 KiB map are built with a 256 KiB / 64 KiB one (marked †).
#
# Usage: firmware-examples/m4f-table.sh [MODEL ...]   (default: all shipped)
# Needs what run-tests needs (qemu-system-arm with plugins, arm-none-eabi-size).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out="$here/target/m4f-table"
mkdir -p "$out"
gcc -shared -fPIC -O2 -Wall -o "$out/libinsncount.so" "$here/qemu-plugin/insncount.c"

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(8gaussians-mcu shuttle 8gaussians cardio satellite power)

echo "| model | weights | M4F flash (bytes) | peak stack (bytes) | rk4-8 instructions per log p | instructions per FLOP |"
echo "|---|---|---|---|---|---|"
for m in "${models[@]}"; do
  for enc in f32 f16 i8; do
    file="$root/models/$m/model.ffjd"
    [ "$enc" = f32 ] || file="$root/models/$m/model.$enc.ffjd"
    if [ ! -f "$file" ]; then
      # The larger models ship f32 only: convert on the fly, as a user would.
      [ "$enc" = f32 ] && continue
      "$root/target/release/trainer" convert "$root/models/$m/model.ffjd" --weights "$enc" \
        --out "$out/$m.$enc.ffjd" >/dev/null
      file="$out/$m.$enc.ffjd"
    fi
    rows="$root/models/$m/golden-rows.csv"
    features=()
    [ "$enc" = f32 ] || features=(--features quantized)
    # A file that ends in a kernel density base (format version 5) needs `kde`.
    if "$root/target/release/trainer" inspect "$file" | grep -q "base: Gaussian KDE"; then features+=(--features kde); fi
    label="$m-$enc" mark=""
    build() {
      (cd "$here/qemu-m4f" && FFJORD_MODEL="$file" CARGO_TARGET_DIR="$out/target" "$@" \
        cargo build --release --quiet "${features[@]}")
    }
    if [ -f "$rows" ]; then export FFJORD_ROWS="$rows"; else unset FFJORD_ROWS; fi
    if ! build env 2>"$out/$label.build"; then
      build env FFJORD_MEMORY_X="$here/qemu-m4f/memory-large.x" 2>>"$out/$label.build"
      mark=" †"
    fi
    elf="$out/target/thumbv7em-none-eabihf/release/qemu-m4f"
    s=$(nm "$elf" | awk '/ ffjord_mark_start$/{print $1}')
    e=$(nm "$elf" | awk '/ ffjord_mark_end$/{print $1}')
    timeout 600 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
      -semihosting-config enable=on,target=native \
      -plugin "$out/libinsncount.so,start=$(printf '0x%x' $((0x$s & ~1))),end=$(printf '0x%x' $((0x$e & ~1))),out=$out/$label.counts" \
      -kernel "$elf" >"$out/$label.log" 2>&1 || { echo "FAIL: $label (log: $out/$label.log)" >&2; exit 1; }
    arm-none-eabi-size -A "$elf" >"$out/$label.size"
    python3 - "$out" "$label" "$m$mark" "$enc" <<'PY'
import os, re, sys
out, label, name, enc = sys.argv[1:]
log = open(os.path.join(out, label + ".log")).read()
if not re.search(r"failures = 0", log):
    sys.exit(f"{label}: the device disagrees with the host")
sec = {}
for line in open(os.path.join(out, label + ".size")):
    m = re.match(r"^(\.\S+)\s+(\d+)\s+(\d+)", line)
    if m:
        sec[m.group(1)] = int(m.group(2))
flash = sum(sec.get(s, 0) for s in (".vector_table", ".text", ".rodata", ".data"))
stack = int(re.search(r"peak stack = (\d+) bytes", log).group(1))
flops = dict(re.findall(r"^flops (\S+) (\d+)", log, re.M))
names = list(flops)
counts = [int(x) for x in open(os.path.join(out, label + ".counts"))]
per = len(counts) // len(names)
i = names.index("rk4-8")
mean = sum(counts[i * per:(i + 1) * per]) / per
print(f"| {name} | {enc} | {flash:,} | {stack:,} | {mean:,.0f} | {mean / int(flops['rk4-8']):.2f} |")
PY
  done
done
