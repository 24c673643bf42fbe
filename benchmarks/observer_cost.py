"""Cost of ``Observer.compute()`` against one training step of a ~10M-parameter GPT-like model, one CPU thread.

The per-step observation is ``compute(spectra=False)`` + ``units()`` + ``trajectory()``, what a monitor needs at
every step; the attention singular-value spectra are added at log steps only (``spectra=True``), measured apart.

Arms are interleaved in one process (train step, observe, train step, observe, ...) after warm-up, so machine noise
hits both alike. Run: ``python -m benchmarks.observer_cost`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.models import TinyGPT, n_params
from shockmon import Observer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model, few repetitions (checks the pipeline only)")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/observer_cost.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if args.quick:
        model, batch, reps = TinyGPT(vocab=500, d=64, heads=4, layers=2, ctx=32), (2, 32), 3
    else:
        model, batch, reps = TinyGPT(), (8, 128), args.reps
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    vocab = model.head.out_features
    x = torch.randint(0, vocab, batch)
    y = torch.randint(0, vocab, batch)
    obs = Observer(model)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()

    def observe(spectra: bool) -> None:
        vals = obs.compute(spectra=spectra)
        obs.units()
        obs.trajectory(vals)

    for _ in range(2):
        train_step()
        observe(True)
    t_train, t_obs, t_full = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        train_step()
        t1 = time.perf_counter()
        observe(False)
        t2 = time.perf_counter()
        observe(True)
        t3 = time.perf_counter()
        t_train.append(t1 - t0)
        t_obs.append(t2 - t1)
        t_full.append(t3 - t2)
    res = {
        "params": n_params(model),
        "batch": list(batch),
        "reps": reps,
        "train_step_ms_median": 1e3 * statistics.median(t_train),
        "compute_ms_median": 1e3 * statistics.median(t_obs),
        "compute_ms_min": 1e3 * min(t_obs),
        "compute_ms_max": 1e3 * max(t_obs),
        "ratio": statistics.median(t_obs) / statistics.median(t_train),
        "compute_with_spectra_ms_median": 1e3 * statistics.median(t_full),
        "ratio_with_spectra": statistics.median(t_full) / statistics.median(t_train),
        "observables": len(obs.compute()),
        "quick": args.quick,
        "torch": torch.__version__,
    }
    print(
        f"model: {res['params'] / 1e6:.1f}M parameters, batch {batch[0]}x{batch[1]}, AdamW, 1 CPU thread, {reps} reps"
    )
    print(f"train step      {res['train_step_ms_median']:9.1f} ms (median)")
    print(
        f"per step: compute(spectra=False) + units + trajectory {res['compute_ms_median']:7.1f} ms (median; min "
        f"{res['compute_ms_min']:.1f}, max {res['compute_ms_max']:.1f}) -> {100 * res['ratio']:.2f} % of a step"
    )
    print(
        f"log step: compute(spectra=True) + units + trajectory  {res['compute_with_spectra_ms_median']:7.1f} ms"
        f" -> {100 * res['ratio_with_spectra']:.2f} % of a step; {res['observables']} observables"
    )
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
