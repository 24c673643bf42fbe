"""One device→host transfer for many tensors.

The monitor's contract is *at most one* device→host copy per logging step. :func:`to_host` packs every value
(0-d scalars and 1-D per-unit vectors alike) into one flat tensor on the device, copies it once, and splits it
back on the host into Python floats and NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor


def pack(values: Mapping[str, Tensor]) -> tuple[Tensor | None, list[tuple[str, int, bool]]]:
    """Flatten ``values`` into one tensor on their device.

    Returns:
        ``(flat, spec)``: the concatenated values (``None`` when there are none) and, per key, ``(key, numel,
        is_scalar)`` in order, for :func:`unpack`.

    Example:
        >>> flat, spec = pack({"a": torch.tensor(1.0), "b": torch.tensor([2.0, 3.0])})
        >>> flat.tolist(), spec
        ([1.0, 2.0, 3.0], [('a', 1, True), ('b', 2, False)])
    """
    if not values:
        return None, []
    wide = any(v.dtype == torch.float64 for v in values.values())
    dtype = torch.float64 if wide else torch.float32
    spec = [(k, int(v.numel()), v.ndim == 0) for k, v in values.items()]
    flat = torch.cat([v.detach().reshape(-1).to(dtype) for v in values.values()])
    return flat, spec


def unpack(flat: Tensor | None, spec: list[tuple[str, int, bool]]) -> dict[str, float | np.ndarray]:
    """Inverse of :func:`pack`, for a host tensor: scalars become ``float``, vectors ``numpy`` arrays."""
    out: dict[str, float | np.ndarray] = {}
    if flat is None:
        return out
    arr = flat.numpy()
    i = 0
    for key, n, scalar in spec:
        chunk = arr[i : i + n]
        out[key] = float(chunk[0]) if scalar else chunk.copy()
        i += n
    return out


def to_host(values: Mapping[str, Tensor]) -> dict[str, float | np.ndarray]:
    """Copy ``values`` to the host in one transfer.

    Example:
        >>> to_host({"x": torch.tensor(2.5), "v": torch.arange(3.0)})
        {'x': 2.5, 'v': array([0., 1., 2.], dtype=float32)}
    """
    flat, spec = pack(values)
    return unpack(None if flat is None else flat.cpu(), spec)
