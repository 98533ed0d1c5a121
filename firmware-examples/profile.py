"""Where the instructions of one measured interval kind go, per function.

Usage: profile.py ELF PROFILE FIRST LAST [TOP]
PROFILE is the instruction-count plugin's `profile=` file (lines
`interval N`, then `ADDR INSNS` per translation block); intervals FIRST..LAST
(one per row) are summed, each block is credited to the function that
contains its address (nm), and the TOP functions are printed as a table of
instructions per row.
"""
import bisect
import collections
import subprocess
import sys

elf, prof, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
top = int(sys.argv[5]) if len(sys.argv) > 5 else 8
syms = []
nm = subprocess.run(["nm", "-C", "-n", "--defined-only", elf], capture_output=True, text=True, check=True)
for line in nm.stdout.splitlines():
    parts = line.split(" ", 2)
    # Code symbols only; ARM's mapping symbols ($t, $d) are not functions.
    if len(parts) == 3 and parts[1] in "tTwW" and not parts[2].startswith("$"):
        syms.append((int(parts[0], 16) & ~1, parts[2]))
addrs = [a for a, _ in syms]
per_function = collections.Counter()
interval, total = -1, 0
for line in open(prof):
    if line.startswith("interval"):
        interval = int(line.split()[1])
        continue
    if first <= interval <= last:
        pc, n = line.split()
        i = bisect.bisect_right(addrs, int(pc, 16)) - 1
        per_function[syms[i][1] if i >= 0 else "?"] += int(n)
        total += int(n)
rows = last - first + 1
print("| function | instructions per row | share |")
print("|---|---|---|")
for name, n in per_function.most_common(top):
    name = name.split("::h")[0] if "::h" in name else name
    print(f"| `{name}` | {n / rows:,.0f} | {100 * n / total:.1f}% |")
print(f"| all | {total / rows:,.0f} | 100% |")
