"""Host-to-device copies that do not synchronise: shared by the observer and the tracker (which know nothing of each
other)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["to_device"]


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """A host tensor copied to ``device`` without waiting for the device's queue.

    ``torch.tensor(data, device="cuda")`` and a plain ``.to("cuda")`` of a CPU tensor copy and then synchronise the
    stream: the host waits for every queued kernel (the whole training step) -- a host sync, what the per-step path
    must never do (pytorch/pytorch#120996). A non-blocking copy from pageable memory is staged by the driver before
    the call returns, so the source may go at once. No-op on the CPU. For a scalar, ``torch.full((), v,
    device=...)`` needs no copy at all.
    """
    return t.to(device, non_blocking=True)
