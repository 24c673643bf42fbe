"""Measure what one observation of an FSDP2-sharded model all-reduces, against its parameter count.

``python sharded_bytes.py [--world 2]`` shards MLPs and Transformer encoder blocks of growing width with
``fully_shard`` over ``world`` gloo processes on CPU, observes each once (``Observer.compute()`` +
``grad_observables()``, float32 accumulation) and prints a Markdown table: parameters, bytes of parameters,
bytes all-reduced per observation and rounds. A measurement for the README, not a test
(``test_distributed.py`` and ``test_sharded.py`` assert the properties).
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import torch
from torch import nn

#: (name, builder, input shape)
MODELS: list[tuple[str, Any, tuple[int, ...]]] = [
    (
        f"MLP {d}-{4 * d}-{4 * d}-{d}",
        (
            lambda d=d: nn.Sequential(
                nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)
            )
        ),
        (8, d),
    )
    for d in (64, 256, 1024)
] + [
    (
        f"TransformerEncoderLayer d={d}, {h} heads, ff={4 * d}",
        (
            lambda d=d, h=h: nn.TransformerEncoderLayer(
                d, h, dim_feedforward=4 * d, dropout=0.0, batch_first=True
            )
        ),
        (2, 8, d),
    )
    for d, h in ((64, 4), (256, 8), (1024, 16))
]


def _worker(rank: int, world: int, port: int, queue: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from shockmon import Observer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for name, build, shape in MODELS:
            torch.manual_seed(0)
            model = build()
            n_params = sum(p.numel() for p in model.parameters())
            done: list[str] = []
            for path, mod in model.named_modules():
                if isinstance(mod, (nn.MultiheadAttention, nn.Linear)) and not any(
                    path.startswith(d + ".") for d in done
                ):
                    fully_shard(mod, mesh=mesh)
                    done.append(path)
            fully_shard(model, mesh=mesh)
            model(torch.randn(*shape)).square().mean().backward()
            obs = Observer(model)
            obs.compute()
            b, r = obs.rows.bytes, obs.rows.rounds
            obs.grad_observables()
            if rank == 0:
                queue.put((name, n_params, b, r, obs.rows.bytes - b, obs.rows.rounds - r))
    finally:
        dist.destroy_process_group()


def main(world: int) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, port, queue), nprocs=world, join=True, start_method="spawn")
    print(f"world size {world}, float32 parameters and accumulation\n")
    print(
        "| model | parameters | parameter bytes | all-reduced per observation | rounds | of which gradients |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    while not queue.empty():
        name, n, b, r, gb, gr = queue.get()
        total = b + gb
        print(f"| {name} | {n:,} | {4 * n:,} | {total:,} B ({total / (4 * n):.2%}) | {r} + {gr} | {gb:,} B |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    main(parser.parse_args().world)
