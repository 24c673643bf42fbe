"""Condensation (Luo et al. 2021; Zhou et al. 2022): with a tiny initialisation, the hidden neurons' input
directions collapse onto a few before the loss moves.

A 1-D input with bias, 500 hidden ReLU units and a linear output, every weight and bias drawn from ``N(0,
1e-8)`` (standard deviation 1e-4), full-batch GD with lr 0.1 on 8 points ``x`` evenly spaced in [-1, 1] with
targets ``sin(pi x)``, loss ``0.5 mean (f - y)^2``; 400 steps.

The *effective direction count* is ``exp`` of the entropy of the neurons' input angles ``atan2(b_i, w_i)``
binned into 100 bins over ``[-pi, pi]``, each neuron weighted by its amplitude ``|a_i| |(w_i, b_i)|``: about 80
at initialisation (random directions), 2 after condensation. Transition: the first evaluation (every 2 steps)
with the count below 3 (at ~120 steps; the loss starts to fall at ~200).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from benchmarks.detection.cases import Case
from benchmarks.detection.record import BenchModule, Recording, Setup

HIDDEN = 500
SIGMA = 1e-4


def direction_count(net: nn.Sequential) -> float:
    """Amplitude-weighted effective number of distinct input directions (``exp`` entropy of 100 angle bins)."""
    w, b, a = net[0].weight[:, 0], net[0].bias, net[2].weight[0]
    theta = torch.atan2(b, w)
    amp = torch.sqrt(w * w + b * b) * a.abs()
    idx = ((theta + math.pi) / (2 * math.pi) * 100).long().clamp(0, 99)
    h = torch.zeros(100, dtype=amp.dtype).index_add_(0, idx, amp)
    p = h / h.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mse1(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).square().mean()


def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, y, x_test, y_test)``: 8 training points of ``sin(pi x)`` on ``[-1, 1]``, 101 test points."""
    x = torch.linspace(-1, 1, 8)[:, None]
    xt = torch.linspace(-1, 1, 101)[:, None]
    return x, torch.sin(math.pi * x), xt, torch.sin(math.pi * xt)


def setup(seed: int, quick: bool, sigma: float = SIGMA, lr: float = 0.1, steps: int = 400) -> Setup:
    x, y, xt, yt = data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, sigma)
    module = BenchModule(net, x, y, mse1, lambda p: torch.optim.SGD(p, lr=lr))

    @torch.no_grad()
    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        test = float(mse1(m(xt), yt))
        return {"directions": direction_count(net), "test_loss": test, "heldout": -test}

    return Setup(module, 60 if quick else steps, 2, evaluate,
                 {"sigma": sigma, "lr": lr, "hidden": HIDDEN, "points": 8})


def _collapse(rec: Recording) -> list[int]:
    d = rec.evals["directions"]
    hit = [i for i, v in enumerate(d) if v < 3.0]
    return [int(rec.eval_steps[hit[0]])] if hit else []


CASES = [
    Case("condensation", "condensation", setup, _collapse, window=80,
         rule="first evaluation (every 2 steps) with the effective direction count < 3"),
]
