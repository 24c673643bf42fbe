"""The catapult phase (Lewkowycz et al. 2020): a wide network trained above ``2/lambda_0`` first blows up, then
settles into a flatter region.

An NTK-parametrised two-layer ReLU network ``f(x) = v . relu(W x / sqrt(d)) / sqrt(m)``, width ``m = 2048``,
``W, v ~ N(0, 1)``, no biases, on 256 standardised digits with one-hot targets and loss ``0.5 mean_i |f - y|^2``;
full-batch GD with ``eta = c / lambda_0``, ``lambda_0`` the top Hessian eigenvalue at initialisation and ``c``
in ``(2.5, 3.0, 3.5)`` by ``seed % 3`` (so the selection seeds 0--2 and the report seeds 3--5 see the same
values). The ``1/sqrt(d)`` input factor is folded into the data and ``1/sqrt(m)`` is applied outside the
observed ``nn.Sequential``, so symmetry discovery sees a plain Linear-ReLU-Linear chain. 200 steps.

Transition: the step of the loss's maximum (the catapult's peak, at a few steps). A detector needs a few
observations before it can say anything, so this case mostly measures how early one can be.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from benchmarks.detection.cases import Case
from benchmarks.detection.eos import Sharpness, digits, mse
from benchmarks.detection.record import BenchModule, Recording, Setup

WIDTH = 2048
C_VALUES = (2.5, 3.0, 3.5)


def setup(seed: int, quick: bool, c: float | None = None, steps: int = 200) -> Setup:
    c = C_VALUES[seed % 3] if c is None else c
    x, lab, xt, labt = digits(256, seed)
    d = x.shape[1]
    x, xt = x / math.sqrt(d), xt / math.sqrt(d)
    y = torch.nn.functional.one_hot(lab, 10).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(d, WIDTH, bias=False), nn.ReLU(), nn.Linear(WIDTH, 10, bias=False))
        with torch.no_grad():
            for p in net.parameters():
                p.normal_()
    scale = 1.0 / math.sqrt(WIDTH)

    def fwd(m: nn.Module, inp):
        return m(inp) if isinstance(m, BenchModule) else m(inp) * scale

    lam0 = Sharpness(x, y, lambda out, t: mse(out * scale, t), iters=50)(net)
    eta = c / lam0
    module = BenchModule(net, x, y, mse, lambda p: torch.optim.SGD(p, lr=eta), scale=scale)
    sharp = Sharpness(x, y, mse)

    @torch.no_grad()
    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        out = fwd(m, xt)
        acc = float((out.argmax(-1) == labt).float().mean())
        return {"sharpness": sharp(m), "test_acc": acc, "heldout": acc}

    return Setup(module, 30 if quick else steps, 1, evaluate,
                 {"c": c, "lambda0": lam0, "eta": eta, "width": WIDTH, "n": 256})


def _peak(rec: Recording) -> list[int]:
    loss = np.where(np.isfinite(rec.loss), rec.loss, np.inf)
    return [int(rec.steps[int(np.argmax(loss))])]


CASES = [
    Case("catapult", "catapult", setup, _peak, window=20, rule="the step of the training loss's maximum"),
]
