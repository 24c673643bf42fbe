"""``python discover_sharded.py``: symmetry discovery of FSDP2-sharded custom blocks, in one process (gloo).

Prints one JSON line per model: whether ``discover`` reports the same groups for the model with ``fully_shard``
applied per block and to the root as for the same model unsharded, and whether a forward and backward pass still
run after it (tracing runs ``forward`` with FSDP's hooks off: they would unshard on symbolic values).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_symmetry import _NanoGPTBlock, _TinyResNet  # noqa: E402

from shockmon import Observer, discover  # noqa: E402


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    models = {
        "nanogpt": (lambda: nn.Sequential(_NanoGPTBlock(), _NanoGPTBlock()), (2, 5, 8)),
        "resnet": (_TinyResNet, (2, 3, 6, 6)),
    }
    for name, (make, shape) in models.items():
        torch.manual_seed(0)
        plain = discover(make()).rows()
        torch.manual_seed(0)
        model = make()
        for block in list(model.children()):
            if any(True for _ in block.parameters()):
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sharded = discover(model).rows()
        model(torch.randn(*shape)).sum().backward()
        values = Observer(model).compute()  # dynamics/ values need a previous call: NaN on the first
        finite = all(torch.isfinite(v).all() for k, v in values.items() if k.startswith("quotient/"))
        print(json.dumps({"model": name, "groups": len(plain), "same": sharded == plain, "trains": True,
                          "finite": bool(finite)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
