"""Edge of stability (Cohen et al. 2021): full-batch GD on MSE until the sharpness reaches ``2/eta``.

1000 digits (scikit-learn's bundled ``load_digits``, a seeded subset, pixels standardised), one-hot targets, an
MLP 64-200-200-10, loss ``0.5 * mean_i |f(x_i) - y_i|^2``, GD with ``eta = 0.2``, 450 steps. Sharpness (the top
Hessian eigenvalue of the training loss) is measured every ``eval_every`` steps by warm-started power
iteration on Hessian-vector products. Transition: the first measurement with sharpness >= 1.9/eta.

- ``eos_tanh``: the issue's tanh MLP; sharpness reaches 2/eta at ~260--280 steps. A tanh network has no
  continuous parameter symmetry (only unit permutations and sign flips); ``ShockMonitor`` tracks its hidden
  units as the ``permute`` family's particles. Why no alert comes before the transition:
  :mod:`benchmarks.detection.evidence`.
- ``eos_relu`` (added): the same with ReLU, which shockmon can see; sharpness reaches 2/eta earlier, at
  ~50--125 steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from benchmarks.detection.cases import Case, first_at_least
from benchmarks.detection.record import BenchModule, Recording, Setup

ETA = 0.2


def digits(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` training digits and the rest as a test set (seeded split) with their labels; each pixel
    standardised by the training set's mean and standard deviation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32)
    lab = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(10_000 + seed))
    tr, te = perm[:n], perm[n:]
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp_min(1e-3)
    X = (X - mu) / sd
    return X[tr], lab[tr], X[te], lab[te]


def mse(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y).square().sum(-1).mean()


class Sharpness:
    """Top Hessian eigenvalue of ``loss_fn(module(x), y)`` by power iteration, warm-started across calls."""

    def __init__(self, x: Tensor, y: Tensor, loss_fn, iters: int = 20, warm_iters: int = 6) -> None:
        self.x, self.y, self.loss_fn = x, y, loss_fn
        self.iters, self.warm_iters = iters, warm_iters
        self.v: list[Tensor] | None = None

    def __call__(self, module: nn.Module) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = self.loss_fn(module(self.x), self.y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            if self.v is None:
                g = torch.Generator().manual_seed(0)
                v = [torch.randn(p.shape, generator=g) for p in params]
                iters = self.iters
            else:
                v, iters = self.v, self.warm_iters
            lam = 0.0
            for i in range(iters):
                nrm = torch.sqrt(sum((t * t).sum() for t in v))
                v = [t / nrm for t in v]
                hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=i < iters - 1)
                lam = float(sum((a * b).sum() for a, b in zip(v, hv)))
                v = [h.detach() for h in hv]
        self.v = v
        return lam


def mlp(widths: list[int], seed: int, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """``Linear`` layers of the given widths joined by ``act``, PyTorch's default init under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), act()]
        return nn.Sequential(*layers[:-1])


def setup(seed: int, quick: bool, act: type[nn.Module] = nn.Tanh, eta: float = ETA, steps: int = 450) -> Setup:
    x, lab, xt, labt = digits(1000, seed)
    y = torch.nn.functional.one_hot(lab, 10).float()
    yt = torch.nn.functional.one_hot(labt, 10).float()
    net = mlp([64, 200, 200, 10], seed, act)
    module = BenchModule(net, x, y, mse, lambda p: torch.optim.SGD(p, lr=eta))
    sharp = Sharpness(x, y, mse)

    @torch.no_grad()
    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        out = m(xt)
        acc = float((out.argmax(-1) == labt).float().mean())
        return {"sharpness": sharp(m), "test_acc": acc, "heldout": acc, "test_loss": float(mse(out, yt))}

    return Setup(module, 60 if quick else steps, 5, evaluate,
                 {"eta": eta, "n": 1000, "widths": [64, 200, 200, 10], "activation": act.__name__})


def _eos(rec: Recording) -> list[int]:
    s = first_at_least(rec.eval_steps, rec.evals["sharpness"], 1.9 / rec.config["eta"])
    return [] if s is None or math.isnan(s) else [int(s)]


RULE = "first sharpness measurement (every 5 steps) >= 1.9/eta"
CASES = [
    Case("eos_tanh", "edge_of_stability", lambda seed, quick: setup(seed, quick, nn.Tanh), _eos, 100, RULE),
    Case("eos_relu", "edge_of_stability", lambda seed, quick: setup(seed, quick, nn.ReLU), _eos, 100, RULE),
]
