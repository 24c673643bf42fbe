"""Worker for test_sharded.py: computes observables of FSDP2-sharded models in one of two gloo processes."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from proc_exit import exit_cleanly
from torch import nn


def build(name: str) -> nn.Module:
    sys.path.insert(0, os.path.dirname(__file__))
    from symmetry_models import cnn, transformer_layer

    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    if name == "wide":  # the same units, 85x the input width: parameters grow, communication must not
        return nn.Sequential(nn.Linear(512, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))
    if name == "transformer":
        return transformer_layer()
    if name == "cnn":
        return cnn()
    raise ValueError(name)


def batch(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = {"mlp": (5, 6), "wide": (5, 512), "transformer": (3, 5, 16), "cnn": (4, 3, 8, 8)}[name]
    return torch.randn(*shape, generator=g)


def observe(model: nn.Module, name: str, **kw: object) -> dict[str, torch.Tensor]:
    from shockmon import Observer

    obs = Observer(model, angular_step=True, **kw)  # type: ignore[arg-type]
    model.train()
    model.zero_grad()
    model(batch(name)).square().mean().backward()
    res: dict[str, torch.Tensor] = {}
    for step in range(2):
        vals = obs.compute(lr=0.1)
        res.update({f"{step}:{k}": v.detach().clone() for k, v in vals.items()})
        res.update({f"{step}:units/{k}": v.detach().clone() for k, v in obs.units().items()})
        with torch.no_grad():  # a deterministic "optimizer step" so that dynamics/ values have a previous step
            for p in model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                local.mul_(0.97).add_(0.01)
    res.update({f"grad:{k}": v for k, v in obs.grad_observables().items()})
    res["bytes"] = torch.tensor(float(obs.rows.bytes))
    res["rounds"] = torch.tensor(float(obs.rows.rounds))
    return res


def worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (world,))
        model = build(name)
        done: list[str] = []
        for path, mod in model.named_modules():
            if isinstance(mod, (nn.MultiheadAttention, nn.Linear, nn.Conv2d)) and not any(
                path.startswith(d + ".") for d in done
            ):
                fully_shard(mod, mesh=mesh)
                done.append(path)
        fully_shard(model, mesh=mesh)

        def no_gather(*a: object, **k: object) -> None:
            raise AssertionError("a full parameter was gathered")

        full_tensor = DTensor.full_tensor
        DTensor.full_tensor = no_gather  # type: ignore[method-assign]
        try:
            res = observe(model, name)
        finally:
            DTensor.full_tensor = full_tensor  # type: ignore[method-assign]
        res["params"] = torch.tensor(float(sum(p.numel() for p in model.parameters())))
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_cleanly()  # the results are saved; only the success path exits here
