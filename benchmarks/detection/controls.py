"""Controls: the cases' networks at small learning rates on smooth targets -- no transition by construction.

Every alert on a control is a false alarm. Targets are a fixed random linear teacher ``y = x A / sqrt(d_in)``
of the standardised digits (``A ~ N(0, 1)``, 10 outputs), loss ``0.5 mean_i |f - y|^2`` unless noted.

- ``control_relu_gd``: the ReLU MLP 64-200-200-10 of ``eos_relu``, GD lr 0.02 (a tenth), 2000 steps.
- ``control_relu_adam``: the ReLU MLP 64-256-256-10 of ``spikes_relu``, Adam lr 1e-4, 2000 steps.
- ``control_ntk``: the width-2048 NTK network of ``catapult`` with ``eta = 0.5 / lambda_0`` (stable), 1000 steps.
- ``control_condensation``: the 1-500-1 ReLU network of ``condensation`` with PyTorch's default (large)
  initialisation and lr 0.01 on its 8 points, 2000 steps (lazy: the directions barely move).
- ``control_grok_mlp``: the grokking MLP with AdamW lr 3e-4, weight decay 0.01, on the smooth regression
  target ``(cos, sin)(2 pi k a / p)`` and ``(cos, sin)(2 pi k b / p)``, ``k = 1, 2`` (8 outputs), 1200 steps (by
  ~1500 steps the loss is ~1e-5 and AdamW's noise starts to show small bumps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from benchmarks.detection import catapult, condensation, eos
from benchmarks.detection.cases import Case, no_transition
from benchmarks.detection.record import BenchModule, Setup
from shockmon.demo import GrokMLP, modular_addition


def _teacher(x: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(20_000 + seed)
    A = torch.randn(x.shape[1], 10, generator=g)
    return x @ A / math.sqrt(x.shape[1])


def _heldout_mse(net_eval, xt: Tensor, yt: Tensor):
    @torch.no_grad()
    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        test = float(eos.mse(net_eval(m, xt), yt))
        return {"test_loss": test, "heldout": -test}

    return evaluate


def _digits_control(seed: int, quick: bool, widths: list[int], opt, steps: int) -> Setup:
    x, _, xt, _ = eos.digits(1000, seed)
    y, yt = _teacher(x, seed), _teacher(xt, seed)
    net = eos.mlp(widths, seed, nn.ReLU)
    module = BenchModule(net, x, y, eos.mse, opt)
    return Setup(module, 100 if quick else steps, 10, _heldout_mse(lambda m, a: m(a), xt, yt),
                 {"widths": widths, "target": "linear teacher"})


def relu_gd(seed: int, quick: bool) -> Setup:
    return _digits_control(seed, quick, [64, 200, 200, 10], lambda p: torch.optim.SGD(p, lr=0.02), 2000)


def relu_adam(seed: int, quick: bool) -> Setup:
    return _digits_control(seed, quick, [64, 256, 256, 10], lambda p: torch.optim.Adam(p, lr=1e-4), 2000)


def ntk(seed: int, quick: bool) -> Setup:
    s = catapult.setup(seed, quick, c=0.5, steps=1000)
    s.steps = 100 if quick else 1000
    s.eval_every = 10
    return s


def condensation_lazy(seed: int, quick: bool) -> Setup:
    x, y, xt, yt = condensation.data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(1, condensation.HIDDEN), nn.ReLU(), nn.Linear(condensation.HIDDEN, 1))
    module = BenchModule(net, x, y, condensation.mse1, lambda p: torch.optim.SGD(p, lr=0.01))
    return Setup(module, 100 if quick else 2000, 10, _heldout_mse(lambda m, a: m(a), xt, yt),
                 {"init": "pytorch default", "lr": 0.01})


def grok_smooth(seed: int, quick: bool) -> Setup:
    p = 97
    x, _, xt, _ = modular_addition(p, 0.5, seed)

    def target(z: Tensor) -> Tensor:
        cols = []
        for k in (1, 2):
            for v in (z[:, 0], z[:, 1]):
                ang = 2 * math.pi * k * v.float() / p
                cols += [torch.cos(ang), torch.sin(ang)]
        return torch.stack(cols, 1)

    y, yt = target(x), target(xt)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GrokMLP(p)
        net.mlp[2] = nn.Linear(net.mlp[2].in_features, 8)
    module = BenchModule(net, x, y, eos.mse,
                         lambda ps: torch.optim.AdamW(ps, lr=3e-4, weight_decay=0.01, betas=(0.9, 0.98)))
    return Setup(module, 100 if quick else 1200, 10, _heldout_mse(lambda m, a: m(a), xt, yt),
                 {"target": "smooth periodic regression", "lr": 3e-4})


RULE = "none (control)"
CASES = [
    Case("control_relu_gd", "control", relu_gd, no_transition, 0, RULE, control=True),
    Case("control_relu_adam", "control", relu_adam, no_transition, 0, RULE, control=True),
    Case("control_ntk", "control", ntk, no_transition, 0, RULE, control=True),
    Case("control_condensation", "control", condensation_lazy, no_transition, 0, RULE, control=True),
    Case("control_grok_mlp", "control", grok_smooth, no_transition, 0, RULE, control=True),
]
