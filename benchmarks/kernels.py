"""Kernels per monitored step: what a GPU pays for in launches, counted on a machine without one.

On a GPU the monitor's per-step work is hundreds of small kernels on small tensors: each launch costs the host
several microseconds whatever the tensor's size, so their *number*, not the arithmetic, sets the per-step
overhead of a large model's monitor. This counts them without a GPU: the model is built on PyTorch's ``meta``
device (shapes only, no memory, no arithmetic: a GPT-2-sized model costs nothing), and the per-step sequence
``ShockMonitor`` runs between log steps -- ``Observer.grads_finite()`` before the optimizer step,
``compute(spectra=False, raw=False)``, ``trajectory()``, ``units()`` and ``BurgersTracker.update()`` after it,
under ``torch.inference_mode()`` -- runs under a ``TorchDispatchMode`` that counts every operator reaching a
backend. ``kernels`` leaves out what launches nothing (views, reshapes, same-dtype ``to``, allocations);
``dispatches`` counts everything (the host's per-operator cost). It cannot see a blocking host-to-device copy
(``torch.tensor(data, device=...)`` copies below the dispatcher): ``tests/test_reliability.py`` watches those (none
after warm-up). A log step adds the gradient observables, the
attention spectra and the raw norms: counted apart.

Models: those of ``benchmarks.overhead`` (tiny MLP, CNN with BatchNorm, TinyGPT 6x256) and its GPT-2-small-sized
configuration (12 layers, d=768, 12 heads), which the overhead benchmark times on CUDA only.

Run: ``python -m benchmarks.kernels`` (``--quick``: the small models only). Writes
``benchmarks/results/kernels.json`` (nothing for ``--quick`` unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.overhead import cases
from shockmon import BurgersTracker, Observer

#: operators that launch no kernel: views, reshapes, allocations, a ``to`` that returns its input, and the CPU scalar
#: an operator wraps a Python number in (``torch.where(c, x, 0.0)``: passed to the kernel by value)
NO_KERNEL = frozenset(
    "view _unsafe_view _reshape_alias reshape slice select unsqueeze squeeze t transpose permute expand alias "
    "detach detach_ as_strided unbind split split_with_sizes unfold diagonal lift_fresh empty empty_like "
    "empty_strided to scalar_tensor".split()
)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, warm: int = 40) -> dict[str, Any]:
    """Kernels and dispatches of one monitored step (and of a log step's extra) for ``cases(...)[name]``."""
    case = {**cases(False, "cpu"), "gpt2": cases(False, "cuda")["gpt2"]}[name]
    with torch.device("meta"):
        net = case.net()
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    observer, tracker = Observer(net), BurgersTracker()

    def step(k: int, log: bool) -> None:
        with torch.inference_mode():
            if log:
                observer.grad_observables(check_finite=True)
            else:
                observer.grads_finite()
            values = observer.compute(lr=1e-3, spectra=log, raw=log)
            tracker.update(k, observer.units(), trajectory=observer.trajectory(values), lr=1e-3)

    for k in range(warm):  # past the tracker's windows: every stage of the update runs
        step(k, False)
    counts = {}
    for what, log in (("step", False), ("log_step", True)):
        with _Count() as c:
            step(warm + int(log), log)
        counts[what] = c.ops
    kernels = {w: sum(v for op, v in c.items() if op not in NO_KERNEL) for w, c in counts.items()}
    return {
        "model": name,
        "describe": case.describe,
        "params": sum(p.numel() for p in net.parameters()),
        "groups": {k: list(v.shape) for k, v in observer.units().items()},
        "kernels_per_step": kernels["step"],
        "dispatches_per_step": sum(counts["step"].values()),
        "log_step_extra_kernels": kernels["log_step"] - kernels["step"],
        "top_ops": dict(Counter({op: v for op, v in counts["step"].items() if op not in NO_KERNEL}).most_common(8)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small models only")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/kernels.json)")
    args = ap.parse_args(argv)
    names = ["mlp", "gpt"] if args.quick else ["mlp", "cnn", "gpt", "gpt2"]
    rows = [count(n) for n in names]
    print(f"{'model':6s} {'parameters':>11s} {'groups':>6s} {'kernels/step':>12s} {'dispatches':>10s}"
          f" {'+log step':>9s}")
    for r in rows:
        print(f"{r['model']:6s} {r['params'] / 1e6:10.1f}M {len(r['groups']):6d} {r['kernels_per_step']:12d}"
              f" {r['dispatches_per_step']:10d} {r['log_step_extra_kernels']:9d}")
    doc = {"torch": torch.__version__, "quick": args.quick, "results": rows}
    out = args.out or (None if args.quick else "benchmarks/results/kernels.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
