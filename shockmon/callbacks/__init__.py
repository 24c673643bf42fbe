"""The Lightning callbacks: :class:`ShockMonitor` observes and logs; :class:`ShockEarlyStopping` acts."""

from __future__ import annotations

from shockmon.callbacks.early_stopping import ShockEarlyStopping, ShockStoppingReason
from shockmon.callbacks.monitor import ShockMonitor

__all__ = ["ShockEarlyStopping", "ShockMonitor", "ShockStoppingReason"]
