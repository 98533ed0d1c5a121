"""Exact log-density of a model (its JSON form, `trainer inspect M --json J`)
with torch + torchdiffeq, the way a Python user would: dopri5 at the same
tolerance, brute-force exact divergence (one VJP per dimension), float32, one
thread. One row at a time (the first 200 rows) and all rows in one batch
(wall and CPU time, fastest of three passes; NFE of the batch solve, and with REF.csv the largest
error against the runtime's tight reference).

Usage: python runtime_torch.py MODEL.json ROWS.csv [TOL] [REF.csv]
"""

import json
import math
import sys
import time

import torch
import torch.nn as nn
from torchdiffeq import odeint

ACT = {"Tanh": torch.tanh, "Softplus": nn.functional.softplus, "Elu": nn.functional.elu, "Identity": lambda x: x}


def activation(a):
    if isinstance(a, dict) and "Swish" in a:
        beta = a["Swish"]["beta"]
        return lambda x: x * torch.sigmoid(beta * x)
    return ACT[a]


class Net(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.layers = spec["layers"]
        self.act = activation(spec["activation"])
        self.w = [torch.tensor(l["weight"]) for l in self.layers]
        self.b = [torch.tensor(l["bias"]) for l in self.layers]
        self.g = [(torch.tensor(l["gate_weight"]), torch.tensor(l["gate_bias"]), torch.tensor(l["hyper_bias"]))
                  if l["kind"] == "ConcatSquash" else None for l in self.layers]

    def forward(self, t, x):
        for i, l in enumerate(self.layers):
            if l["kind"] == "Concat":
                x = torch.cat([t.expand(x.shape[0], 1), x], 1) @ self.w[i].T + self.b[i]
            else:
                x = x @ self.w[i].T + self.b[i]
            if l["kind"] == "ConcatSquash":
                gw, gb, hb = self.g[i]
                x = x * torch.sigmoid(gw * t + gb) + hb * t
            if i + 1 < len(self.layers):
                x = self.act(x)
        return x


class Func(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.nfe = 0

    def forward(self, t, state):
        self.nfe += 1
        z, _ = state
        with torch.enable_grad():
            z = z.requires_grad_(True)
            f = self.net(t, z)
            div = sum(torch.autograd.grad(f[:, i].sum(), z, retain_graph=True)[0][:, i] for i in range(z.shape[1]))
        return f.detach(), -div.detach()


def log_density(model, x, tol):
    logdet = torch.zeros(x.shape[0])
    z = x
    if model["standardize"]:
        mean, std = torch.tensor(model["standardize"]["mean"]), torch.tensor(model["standardize"]["std"])
        z = (z - mean) / std
        logdet = logdet - torch.log(std.abs()).sum()
    for stage in model["stages"]:
        if "affine" in stage:
            a, b = torch.tensor(stage["affine"]["scale"]), torch.tensor(stage["affine"]["shift"])
            z = z * a + b
            logdet = logdet + torch.log(a.abs()).sum()
        else:
            spec = stage["cnf"]
            t = torch.tensor([0.0, spec["end_time"]])
            zs, ells = odeint(spec["func"], (z, torch.zeros(x.shape[0])), t, rtol=tol, atol=tol, method="dopri5")
            z, ell = zs[-1], ells[-1]
            logdet = logdet - ell
    base = (-0.5 * math.log(2 * math.pi) - 0.5 * z.pow(2)).sum(1)
    return base + logdet


def main():
    torch.set_num_threads(1)
    model = json.load(open(sys.argv[1]))
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-5
    d = model["dim"]
    for stage in model["stages"]:
        if "cnf" in stage:
            stage["cnf"]["func"] = Func(Net(stage["cnf"]))
    lines = open(sys.argv[2]).read().split("\n")[1:]
    rows = torch.tensor([[float(v) for v in l.split(",")[:d]] for l in lines if l.strip()])
    single = rows[:200]
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        for i in range(single.shape[0]):
            log_density(model, single[i:i + 1], tol)
        calls += single.shape[0]
    single_us = (time.perf_counter() - t0) / calls * 1e6
    funcs = [stage["cnf"]["func"] for stage in model["stages"] if "cnf" in stage]
    for f in funcs:
        f.nfe = 0
    # Three passes over all rows; the fastest counts (as on the Rust side).
    all_s, all_cpu = float("inf"), float("inf")
    for _ in range(3):
        for f in funcs:
            f.nfe = 0
        t1, c1 = time.perf_counter(), time.process_time()
        log_p = log_density(model, rows, tol)
        all_s, all_cpu = min(all_s, time.perf_counter() - t1), min(all_cpu, time.process_time() - c1)
    out = {"impl": "torch %s + torchdiffeq (f32)" % torch.__version__, "rows": rows.shape[0],
           "single_us": round(single_us, 2), "rows_per_s": round(rows.shape[0] / all_s, 1),
           "rows_per_cpu_s": round(rows.shape[0] / all_cpu, 1), "batch_nfe": sum(f.nfe for f in funcs)}
    if len(sys.argv) > 4:
        ref = torch.tensor([float(v) for v in open(sys.argv[4]).read().split("\n")[1:] if v.strip()])
        out["max_abs_err"] = float((log_p - ref).abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
