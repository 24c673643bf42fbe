"""Where a parameter's rows live: full tensors in one process, or row shards (FSDP2 ``fully_shard``: DTensor
``Shard(0)``) across ranks, and the one collective that completes partial sums.

The observer never gathers a parameter: it computes partial sums from the rows this rank holds (sums of squares,
per-head Gram blocks, per-unit vectors placed at their global rows) and completes them with one SUM all-reduce of a
flat buffer per round. Sizes are O(units), never O(parameters).

Example (no sharding: every parameter is local, and reducing is the identity):
    >>> import torch
    >>> from shockmon.shards import ParamRows
    >>> rows = ParamRows({"w": torch.nn.Parameter(torch.ones(4, 3))})
    >>> rows.sharded, rows.span("w")
    (False, (0, 4, 4))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["ParamRows", "Reducer"]

#: completes partial sums in place (a SUM all-reduce of one flat buffer)
Reducer = Callable[[torch.Tensor], None]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without torch.distributed
        return None
    return DTensor


class ParamRows:
    """Row access to (possibly sharded) parameters.

    Args:
        params: name -> parameter (plain tensors or DTensors with ``Shard(0)``/``Replicate`` placements on a 1-D mesh).
        reduce: completes partial sums in place; default: a SUM all-reduce on the shards' process group when any
            parameter is sharded, nothing otherwise.

    Raises:
        ValueError: a parameter sharded other than by rows on a 1-D mesh, or shards on different meshes.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], reduce: Reducer | None = None) -> None:
        self.params = dict(params)
        self._spans: dict[str, tuple[int, int, int]] = {}
        dt = _dtensor_type()
        meshes = []
        for name, p in self.params.items():
            n = p.shape[0] if p.dim() else 1
            if dt is not None and isinstance(p, dt):
                placements = tuple(p.placements)
                mesh = p.device_mesh
                if all(pl.is_replicate() for pl in placements):
                    self._spans[name] = (0, n, n)
                    continue
                if mesh.ndim != 1 or not (placements[0].is_shard() and getattr(placements[0], "dim", None) == 0):
                    raise ValueError(
                        f"shockmon supports parameters sharded by rows (Shard(0)) on a 1-D mesh (FSDP2 fully_shard),"
                        f" but {name!r} has placements {placements} on a {mesh.ndim}-D mesh"
                    )
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
                r0 = int(offset[0]) if shape[0] else n
                self._spans[name] = (r0, r0 + int(shape[0]), n)
                meshes.append(mesh)
            else:
                self._spans[name] = (0, n, n)
        self.sharded = bool(meshes)
        if meshes and any(m != meshes[0] for m in meshes[1:]):
            raise ValueError("shockmon expects all sharded parameters on one device mesh, but found several")
        self._group = meshes[0].get_group() if meshes else None
        self._reduce = reduce
        #: bytes all-reduced by the last :meth:`reduce` calls since :meth:`reset_bytes`
        self.bytes = 0
        self.rounds = 0

    def local(self, name: str) -> torch.Tensor:
        """The rows of ``name`` this rank holds (the whole tensor when not sharded), detached."""
        p = self.params[name]
        to_local = getattr(p, "to_local", None)
        return (to_local() if to_local is not None else p).detach()

    def span(self, name: str) -> tuple[int, int, int]:
        """``(r0, r1, n)``: this rank holds rows ``[r0, r1)`` of ``n``."""
        return self._spans[name]

    def rows(self, ref: Any, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Local rows of a :class:`~shockmon.symmetry.ParamRef` (a parameter or a row slice of one), cast to
        ``dtype``, with their span relative to the reference."""
        r0, r1, n = self._spans[ref.name]
        a = 0 if ref.start is None else ref.start
        b = n if ref.stop is None else ref.stop
        lo, hi = max(a, r0), min(b, r1)
        t = self.local(ref.name)
        if hi <= lo:
            return t[:0].to(dtype), (0, 0, b - a)
        return t[lo - r0 : hi - r0].to(dtype), (lo - a, hi - a, b - a)

    def grad_rows(self, ref: Any, dtype: torch.dtype) -> torch.Tensor | None:
        """Local rows of the gradient of ``ref`` (same rows as :meth:`rows`), or None when there is no gradient."""
        g = self.params[ref.name].grad
        if g is None:
            return None
        to_local = getattr(g, "to_local", None)
        g = (to_local() if to_local is not None else g).detach()
        r0, r1, n = self._spans[ref.name]
        a = 0 if ref.start is None else ref.start
        b = n if ref.stop is None else ref.stop
        lo, hi = max(a, r0), min(b, r1)
        if hi <= lo:
            return g[:0].to(dtype)
        return g[lo - r0 : hi - r0].to(dtype)

    def reduce(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Complete partial sums: one SUM all-reduce of their flat concatenation (nothing when not sharded)."""
        if not self.sharded and self._reduce is None:
            return list(parts)
        flat = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0)
        self.bytes += flat.numel() * flat.element_size()
        self.rounds += 1
        if self._reduce is not None:
            self._reduce(flat)
        else:
            import torch.distributed as dist

            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group)
        out, i = [], 0
        for p in parts:
            out.append(flat[i : i + p.numel()].view(p.shape))
            i += p.numel()
        return out
