"""The train_step benchmark's model in Python: torch + torchdiffeq, the way the
FFJORD reference code builds it (ConcatSquashLinear layers, tanh, one CNF block
with T = s^2, brute-force exact divergence, odeint_adjoint with dopri5).

Usage: python ffjord_torch.py INIT.json [--iterations N] [--gradient adjoint|backprop]
Starts from the weights in INIT.json (written by the Rust benchmark with
--init-json) and prints one JSON line like the Rust side.
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
from torchdiffeq import odeint, odeint_adjoint


class ConcatSquashLinear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self._layer = nn.Linear(d_in, d_out)
        self._hyper_bias = nn.Linear(1, d_out, bias=False)
        self._hyper_gate = nn.Linear(1, d_out)

    def forward(self, t, x):
        t = t.view(1, 1)
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t)) + self._hyper_bias(t)


class ODEnet(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList()
        for spec in layers:
            d_out = len(spec["weight"])
            d_in = len(spec["weight"][0])
            layer = ConcatSquashLinear(d_in, d_out)
            with torch.no_grad():
                layer._layer.weight.copy_(torch.tensor(spec["weight"]))
                layer._layer.bias.copy_(torch.tensor(spec["bias"]))
                layer._hyper_gate.weight.copy_(torch.tensor(spec["gate_weight"]).view(-1, 1))
                layer._hyper_gate.bias.copy_(torch.tensor(spec["gate_bias"]))
                layer._hyper_bias.weight.copy_(torch.tensor(spec["hyper_bias"]).view(-1, 1))
            self.layers.append(layer)

    def forward(self, t, x):
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def divergence_bf(f, z):
    div = 0.0
    for i in range(z.shape[1]):
        div += torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i]
    return div


class ODEfunc(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.nfe = 0

    def forward(self, t, state):
        z, _ = state
        self.nfe += 1
        with torch.enable_grad():
            z = z.requires_grad_(True)
            f = self.net(t.to(z), z)
            div = divergence_bf(f, z)
        return f, -div.view(-1, 1)


class CNF(nn.Module):
    def __init__(self, odefunc, end_time):
        super().__init__()
        self.odefunc = odefunc
        self.sqrt_end_time = nn.Parameter(torch.tensor(math.sqrt(end_time)))

    def forward(self, x, solve):
        logp = torch.zeros(x.shape[0], 1)
        t = torch.stack([torch.tensor(0.0), self.sqrt_end_time * self.sqrt_end_time])
        z, dlogp = solve(self.odefunc, (x, logp), t, rtol=1e-5, atol=1e-5, method="dopri5")
        return z[-1], dlogp[-1]


def eight_gaussians(n):
    s = 1.0 / math.sqrt(2.0)
    centers = 4.0 * torch.tensor(
        [[1, 0], [-1, 0], [0, 1], [0, -1], [s, s], [s, -s], [-s, s], [-s, -s]], dtype=torch.float32
    )
    idx = torch.randint(0, 8, (n,))
    return (torch.randn(n, 2) * 0.5 + centers[idx]) / 1.414


def main():
    p = argparse.ArgumentParser()
    p.add_argument("init")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--gradient", choices=["adjoint", "backprop"], default="adjoint")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = json.load(open(args.init))
    cnf_spec = spec["stages"][0]["cnf"]
    model = CNF(ODEfunc(ODEnet(cnf_spec["layers"])), cnf_spec["end_time"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    solve = odeint_adjoint if args.gradient == "adjoint" else odeint
    wall = cpu = nfe_f = nfe_b = 0.0
    for it in range(args.iterations + 2):
        x = eight_gaussians(512)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        model.odefunc.nfe = 0
        z, dlogp = model(x, solve)
        logpz = (-0.5 * math.log(2 * math.pi) - 0.5 * z.pow(2)).sum(1, keepdim=True)
        loss = -(logpz - dlogp).mean()
        f = model.odefunc.nfe
        loss.backward()
        opt.step()
        if it >= 2:
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            nfe_f += f
            nfe_b += model.odefunc.nfe - f
    n = args.iterations
    print(json.dumps({
        "impl": "torch %s + torchdiffeq" % torch.__version__, "gradient": args.gradient, "iterations": n,
        "wall_s_per_iter": wall / n, "cpu_s_per_iter": cpu / n,
        "nfe_forward": nfe_f / n, "nfe_backward": nfe_b / n,
    }))


if __name__ == "__main__":
    main()
