"""Adam loss spikes: full-batch Adam on a small MSE problem drives the loss down until it repeatedly jumps
by more than an order of magnitude (the second-moment estimate decays below the gradient's scale).

1000 standardised digits, one-hot targets, loss ``0.5 mean_i |f - y|^2``, an MLP 64-256-256-10, Adam lr 3e-3
(betas (0.9, 0.999), eps 1e-8), 1200 steps. Spikes start at ~520--700 steps and recur every ~50--100 steps.

- ``spikes_tanh``: the issue's tanh MLP (no continuous symmetry: shockmon has nothing to track).
- ``spikes_relu`` (added): the same with ReLU.

Transition: each step at which the training loss exceeds 10x its running minimum, re-armed once the loss is
back below 2x the running minimum.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.detection.cases import Case
from benchmarks.detection.eos import digits, mlp, mse
from benchmarks.detection.record import BenchModule, Recording, Setup


def setup(seed: int, quick: bool, act: type[nn.Module], lr: float = 3e-3, steps: int = 1200) -> Setup:
    x, lab, xt, labt = digits(1000, seed)
    y = torch.nn.functional.one_hot(lab, 10).float()
    net = mlp([64, 256, 256, 10], seed, act)
    module = BenchModule(net, x, y, mse, lambda p: torch.optim.Adam(p, lr=lr))

    @torch.no_grad()
    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        acc = float((m(xt).argmax(-1) == labt).float().mean())
        return {"test_acc": acc, "heldout": acc}

    return Setup(module, 100 if quick else steps, 5, evaluate,
                 {"lr": lr, "widths": [64, 256, 256, 10], "activation": act.__name__})


def spike_steps(steps, loss, factor: float = 10.0, rearm: float = 2.0) -> list[int]:
    """Steps where ``loss > factor * running minimum``, one per excursion (re-armed below ``rearm *`` it)."""
    out: list[int] = []
    run_min, armed = math.inf, True
    for s, v in zip(steps, loss):
        if not math.isfinite(v):
            continue
        if armed and v > factor * run_min:
            out.append(int(s))
            armed = False
        elif v < rearm * run_min:
            armed = True
        run_min = min(run_min, v)
    return out


def _spikes(rec: Recording) -> list[int]:
    return spike_steps(rec.steps, rec.loss)


RULE = "each step with loss > 10x its running minimum (re-armed below 2x)"
CASES = [
    Case("spikes_tanh", "adam_spikes", lambda seed, quick: setup(seed, quick, nn.Tanh), _spikes, 50, RULE),
    Case("spikes_relu", "adam_spikes", lambda seed, quick: setup(seed, quick, nn.ReLU), _spikes, 50, RULE),
]
