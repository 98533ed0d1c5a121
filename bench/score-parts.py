#!/usr/bin/env python3
"""AUROC of each part of a flow's anomaly score, from `trainer score` output.

Usage: bench/score-parts.py SCORES.csv [SCORES.csv ...]

`trainer score --label COLUMN --out SCORES.csv` writes, per row,
`log_p = log_p_base − delta_log_p`: the base density at the latent point
(`log N(z)` on an N(0, I) base, the latent radius) and the log volume change
along the flow. This prints, for each file, the AUROC (larger score = more
anomalous, ties counted half) of
  −log p            the model file's score,
  −log N(z)         the latent radius alone,
  Δ                 the volume change alone (`delta_log_p`),
  −log N(z) ± ½Δ    the two parts with the volume change at half weight.
Python's standard library only.
"""
import bisect
import csv
import sys


def auroc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l]
    neg = sorted(s for s, l in zip(scores, labels) if not l)
    if not pos or not neg:
        sys.exit("need rows of both labels")
    wins = 0.0
    for p in pos:
        lo, hi = bisect.bisect_left(neg, p), bisect.bisect_right(neg, p)
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(pos) * len(neg))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| file | −log p | −log N(z) | Δ | −log N(z) + ½Δ | −log N(z) − ½Δ |")
    print("|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        known = {"row", "log_p", "score", "verdict", "nfe", "log_p_base", "delta_log_p",
                 "log_p_normal", "log_p_background", "ratio_score"}
        label = list(rows[0])[-1] if rows else None
        if label is None or label in known:
            sys.exit(f"{path}: no label column (run trainer score with --label)")
        y = [float(r[label]) != 0 for r in rows]
        base = [float(r["log_p_base"]) for r in rows]
        delta = [float(r["delta_log_p"]) for r in rows]
        parts = [
            [d - b for b, d in zip(base, delta)],
            [-b for b in base],
            delta,
            [-b + 0.5 * d for b, d in zip(base, delta)],
            [-b - 0.5 * d for b, d in zip(base, delta)],
        ]
        print(f"| {path} | " + " | ".join(f"{auroc(s, y):.4f}" for s in parts) + " |")


if __name__ == "__main__":
    main()
