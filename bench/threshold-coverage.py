#!/usr/bin/env python3
"""How many normal rows land above a 0.99 threshold set on n validation rows.

Label-free: it uses only validation scores (the `score` column of `trainer
score --model M --data valid.csv`, one file per model). For each subsample
size n it draws n rows as the calibration set, sets the threshold by each
rank rule, and counts the share of the file's other rows above it; the mean
over draws is the false-positive rate a user should expect. Rules:

  rounded:   the value at index round((n - 1) q) of the sorted scores
             (the trainer's rule before 2026-12-07)
  conformal: the ceil(q (n + 1))-th smallest, the largest if that exceeds n
             (the trainer's rule since; ffjord_trainer::anomaly::quantile)

Usage: bench/threshold-coverage.py SCORES.txt [SCORES.txt ...]
       (one score per line; `trainer score ... | cut -d, -f3 | tail -n +2`)
"""
import math
import random
import sys

Q = 0.99
DRAWS = 300
SIZES = (20, 40, 83, 150, 220, 500)


def rounded(sorted_scores):
    n = len(sorted_scores)
    return sorted_scores[round((n - 1) * Q)]


def conformal(sorted_scores):
    n = len(sorted_scores)
    return sorted_scores[min(math.ceil(Q * (n + 1) - 1e-9), n) - 1]


def main(paths):
    files = [[float(line) for line in open(p) if line.strip()] for p in paths]
    rng = random.Random(2)
    print(f"| n | rounded rank: share above | conformal rank: share above | files |")
    print("|---|---|---|---|")
    for n in SIZES:
        shares = {"rounded": [], "conformal": []}
        used = [v for v in files if len(v) >= n + 20]
        for v in used:
            for _ in range(DRAWS):
                pick = set(rng.sample(range(len(v)), n))
                calib = sorted(v[i] for i in pick)
                rest = [v[i] for i in range(len(v)) if i not in pick]
                for name, rule in (("rounded", rounded), ("conformal", conformal)):
                    t = rule(calib)
                    shares[name].append(sum(r > t for r in rest) / len(rest))
        if used:
            mean = {k: 100 * sum(s) / len(s) for k, s in shares.items()}
            print(f"| {n} | {mean['rounded']:.2f} % | {mean['conformal']:.2f} % | {len(used)} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
