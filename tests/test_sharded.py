"""Sharded parameters (FSDP2 fully_shard, DTensor Shard(0)) give the unsharded observables, without gathering."""

from __future__ import annotations

import socket

import pytest
import sharded_worker
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(name: str, tmp_path) -> list[dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    out = str(tmp_path / name)
    mp.spawn(sharded_worker.worker, args=(2, _free_port(), name, out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "transformer", "cnn"])
def test_sharded_observables_equal_unsharded(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ranks = _run(name, tmp_path)
    ref = sharded_worker.observe(sharded_worker.build(name), name)
    keys = [k for k in ref if k not in ("bytes", "rounds")]
    assert any(k.startswith("grad:") for k in keys) and any("/units/" in k or ":units/" in k for k in keys)
    for res in ranks:
        assert set(keys) <= set(res)
        for k in keys:
            torch.testing.assert_close(
                res[k], ref[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}"
            )
    assert ranks[0]["bytes"].item() == ranks[1]["bytes"].item() > 0


@pytest.mark.slow
def test_sharded_communication_grows_with_units_not_parameters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    narrow, wide = _run("mlp", tmp_path)[0], _run("wide", tmp_path)[0]
    assert wide["params"] > 20 * narrow["params"]
    # the same units: the same bytes (the input width is never communicated); rounds: 2 compute() + 1 grads,
    # a 2-hidden-layer chain needs 2 rounds per compute()
    assert wide["bytes"].item() == narrow["bytes"].item()
    assert narrow["rounds"].item() == 5
    per_obs = narrow["bytes"].item() / 3
    assert per_obs < 1024, per_obs
