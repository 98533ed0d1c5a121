#!/usr/bin/env python3
"""Label-free check of an anomaly score: validation rows against synthetic
outliers made from them.

Usage: bench/synthetic-outliers.py DATA_DIR [COLUMNS_REPLACED] [SEED] > rows.csv

DATA_DIR is a `trainer prepare` folder (train.csv, valid.csv). Every
validation row is written as it is (`anomaly` 0) and four times with
COLUMNS_REPLACED (default 3) random columns replaced by that column's value
in a random training row (`anomaly` 1): a dependency broken while every
column's marginal stays the training rows'. No real outlier is used, so a
score can be compared on these rows without touching the test split:
`trainer score --model M --data rows.csv --label anomaly --out s.csv`, then
`bench/score-parts.py s.csv`. Python's standard library only.
"""
import csv
import random
import sys


def read(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], [[float(v) for v in r] for r in rows[1:]]


def main():
    if len(sys.argv) not in (2, 3, 4):
        sys.exit(__doc__)
    folder = sys.argv[1]
    replaced = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    header, train = read(f"{folder}/train.csv")
    valid_header, valid = read(f"{folder}/valid.csv")
    if valid_header != header:
        sys.exit(f"{folder}: train.csv and valid.csv have different columns")
    d = len(header)
    columns = list(zip(*train))
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(header + ["anomaly"])
    for r in valid:
        out.writerow([repr(v) for v in r] + [0])
    for _ in range(4):
        for r in valid:
            s = list(r)
            for j in rng.sample(range(d), min(replaced, d)):
                s[j] = rng.choice(columns[j])
            out.writerow([repr(v) for v in s] + [1])


if __name__ == "__main__":
    main()
