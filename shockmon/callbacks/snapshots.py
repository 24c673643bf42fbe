"""Particle snapshots: a few units' coordinates at each log step, written to and read from event files.

The characteristic diagram of a group (its units' positions against the step, converging and crossing at a
shock) needs per-unit coordinates over time; the scalars only hold summaries. At each log step the monitor
writes, per group, coordinate 0 of at most ``snapshot_units`` units (a fixed, evenly spaced subset of the
unit indices) as a TensorBoard *tensor summary*:

- tag ``<prefix>/particles/<group>``, plugin name ``shockmon`` (TensorBoard keeps it, shows no dashboard);
- value: a ``(k, 2)`` float array, column 0 the unit indices (module order), column 1 coordinate 0 of those
  units (``¼ log`` path mass for ``rescale/`` groups, ``½ log Σσ²`` of ``W_Q W_Kᵀ`` per head for
  ``attention/`` ones);
- plugin content: JSON ``{"version": 1, "columns": ["unit", "x0"], "num_units": n}``.

Cost: ``k`` values per group per log step, taken from the monitor's one device→host transfer (the values are
selected on the device by :func:`select`, packed with everything else). TensorBoard itself is imported lazily.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

PLUGIN_NAME = "shockmon"
#: Plugin content version; readers skip tags with a newer major version.
FORMAT_VERSION = 1
COLUMNS = ("unit", "x0")


def snapshot_indices(num_units: int, max_units: int) -> np.ndarray:
    """A fixed, evenly spaced subset of ``range(num_units)`` of at most ``max_units`` indices (first and last
    included).

    Example:
        >>> snapshot_indices(10, 4).tolist()
        [0, 3, 6, 9]
        >>> snapshot_indices(3, 64).tolist()
        [0, 1, 2]
        >>> snapshot_indices(5, 0).tolist()
        []
    """
    if num_units <= 0 or max_units <= 0:
        return np.zeros(0, dtype=np.int64)
    if num_units <= max_units:
        return np.arange(num_units, dtype=np.int64)
    return np.unique(np.linspace(0, num_units - 1, max_units).round().astype(np.int64))


class Selector:
    """Selects the snapshot units of each group on the device; index tensors are built once per group.

    Example:
        >>> sel = Selector(max_units=2)
        >>> out = sel.select({"g": torch.tensor([[1.0, 9.0], [2.0, 9.0], [3.0, 9.0]])})
        >>> out["g"].tolist(), sel.indices["g"].tolist()
        ([1.0, 3.0], [0, 2])
    """

    def __init__(self, max_units: int) -> None:
        self.max_units = max_units
        self.indices: dict[str, np.ndarray] = {}
        self._num_units: dict[str, int] = {}
        self._device_index: dict[str, Tensor] = {}

    def num_units(self, group: str) -> int:
        """The unit count of ``group`` at the last :meth:`select`."""
        return self._num_units[group]

    def select(self, units: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Coordinate 0 of the snapshot units of every group, as 1-D device tensors (no host read)."""
        out: dict[str, Tensor] = {}
        for group, x in units.items():
            if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
                continue
            n = int(x.shape[0])  # shapes are host metadata: no sync
            idx = self.indices.get(group)
            if idx is None or self._num_units.get(group) != n:
                idx = snapshot_indices(n, self.max_units)
                self.indices[group], self._num_units[group] = idx, n
                self._device_index.pop(group, None)
            if idx.size == 0:
                continue
            if idx.size == n:
                out[group] = x[:, 0]
                continue
            dev = self._device_index.get(group)
            if dev is None or dev.device != x.device:
                dev = torch.as_tensor(idx, device=x.device)
                self._device_index[group] = dev
            out[group] = x.index_select(0, dev)[:, 0]
        return out


def _summary(tag: str, array: np.ndarray, num_units: int) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.util.tensor_util import make_tensor_proto

    content = json.dumps({"version": FORMAT_VERSION, "columns": list(COLUMNS), "num_units": num_units})
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content.encode())
    )
    value = Summary.Value(tag=tag, tensor=make_tensor_proto(array), metadata=metadata)
    return Summary(value=[value])


def write(
    writer: Any,
    prefix: str,
    values: Mapping[str, np.ndarray],
    indices: Mapping[str, np.ndarray],
    num_units: Mapping[str, int],
    step: int,
) -> None:
    """Write one snapshot per group to ``writer`` (a ``SummaryWriter``) at ``step``.

    Args:
        writer: the TensorBoard logger's ``experiment``.
        prefix: the tag prefix.
        values: ``group -> (k,)`` host values of coordinate 0 (as :meth:`Selector.select` chose them).
        indices: ``group -> (k,)`` unit indices of those values.
        num_units: ``group -> n``, the group's number of units.
        step: the global step.
    """
    file_writer = getattr(writer, "file_writer", None)
    if file_writer is None:
        file_writer = writer._get_file_writer()  # closed writers reopen, as SummaryWriter's own methods do
    for group, v in values.items():
        idx = indices[group]
        array = np.stack([idx.astype(np.float64), np.asarray(v, dtype=np.float64)], axis=1).astype(np.float32)
        file_writer.add_summary(_summary(f"{prefix}/particles/{group}", array, int(num_units[group])), step)


@dataclass(frozen=True)
class Particles:
    """The snapshots of one group read back: ``values[t, j]`` is unit ``units[j]``'s coordinate 0 at
    ``steps[t]``."""

    group: str
    steps: np.ndarray
    units: np.ndarray
    values: np.ndarray
    num_units: int


def accumulator(path: str, tensors: int = 0, scalars: int = 0) -> Any:
    """A loaded TensorBoard ``EventAccumulator`` of the event files in directory ``path``.

    ``tensors`` and ``scalars``: how many records to keep per tag (``0``: all; otherwise a uniform sample that
    always holds the latest); histograms, images and audio are skipped (one kept per tag).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {
        "scalars": scalars,
        "tensors": tensors,
        "histograms": 1,
        "compressedHistograms": 1,
        "images": 1,
        "audio": 1,
    }
    acc = EventAccumulator(str(path), size_guidance=guidance)
    acc.Reload()
    return acc


def read(acc: Any, prefix: str) -> dict[str, Particles]:
    """The snapshots of every group in a loaded ``EventAccumulator``.

    Records whose unit set differs from the last record's are dropped (the unit count changed); a step written
    twice (a resumed run) keeps its last record.
    """
    from tensorboard.util.tensor_util import make_ndarray

    head = f"{prefix}/particles/"
    out: dict[str, Particles] = {}
    for tag in acc.Tags().get("tensors", []):
        if not tag.startswith(head):
            continue
        num_units = 0
        try:
            meta = json.loads(acc.SummaryMetadata(tag).plugin_data.content or b"{}")
            if int(meta.get("version", FORMAT_VERSION)) > FORMAT_VERSION:
                continue
            num_units = int(meta.get("num_units", 0))
        except (KeyError, ValueError, TypeError):
            pass
        by_step: dict[int, np.ndarray] = {}
        for event in acc.Tensors(tag):
            array = make_ndarray(event.tensor_proto)
            if array.ndim == 2 and array.shape[1] >= 2:
                by_step[int(event.step)] = array
        if not by_step:
            continue
        steps = sorted(by_step)
        units = by_step[steps[-1]][:, 0]
        keep = [s for s in steps if np.array_equal(by_step[s][:, 0], units)]
        out[tag[len(head) :]] = Particles(
            group=tag[len(head) :],
            steps=np.asarray(keep, dtype=np.int64),
            units=units.astype(np.int64),
            values=np.stack([by_step[s][:, 1] for s in keep]).astype(np.float64),
            num_units=num_units or int(units.size),
        )
    return out
