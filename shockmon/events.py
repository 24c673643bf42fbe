"""Events emitted by the tracker and acted on by the callbacks.

An event is a small host-side record. The tracker builds events on the device and only turns them into
:class:`ShockEvent` objects in :meth:`shockmon.BurgersTracker.poll`, the one host sync per logging interval.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class EventKind(str, enum.Enum):
    """What happened.

    ``FORECAST``: a shock is predicted within the tracker's horizon. ``SHOCK``: characteristics crossed (or collapsed
    below the viscous width): the shock happened. ``DIVERGENCE``: the input was non-finite (NaN/Inf), an event, never
    an exception. ``INSTABILITY``: a group's particles move exponentially faster update after update -- a linear
    instability (an oscillation past the edge of stability) running away, the precursor of a loss spike; it
    carries no forecast step.
    """

    FORECAST = "forecast"
    SHOCK = "shock"
    DIVERGENCE = "divergence"
    INSTABILITY = "instability"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ShockEvent:
    """One event of the tracker.

    Attributes:
        kind: :class:`EventKind`.
        group: the group (layer, block, ...) it concerns, or ``"trajectory"`` for the trajectory view.
        channel: ``"particle"`` or ``"trajectory"`` (which view produced it), or ``"input"`` for divergence.
        step: the step at which it fired.
        predicted_step: the forecast shock step at that moment (``inf`` when none; a ``shock`` that no consistent
            forecast preceded, one that had already formed, carries its own step).
        strength: a positive number: how strongly compressive / significant (``z``-score-like); larger is stronger.
        units: indices (module order) of the units most involved, possibly empty.

    Example:
        >>> e = ShockEvent(EventKind.FORECAST, "mlp.0", "particle", 120, 180.0, 4.2, (3,))
        >>> e.lead
        60.0
        >>> print(e.message)
        forecast in mlp.0 (particle) at step 120: shock predicted at step 180 (in 60 steps), strength 4.20, units [3]
    """

    kind: EventKind
    group: str
    channel: str
    step: int
    predicted_step: float = math.inf
    strength: float = 0.0
    units: tuple[int, ...] = field(default_factory=tuple)

    @property
    def lead(self) -> float:
        """Steps from this event to the predicted shock (``inf`` when none is predicted)."""
        return float(self.predicted_step) - float(self.step)

    @property
    def message(self) -> str:
        """A one-line human-readable description."""
        head = f"{self.kind.value} in {self.group} ({self.channel}) at step {self.step}"
        if math.isfinite(self.predicted_step):
            head += f": shock predicted at step {self.predicted_step:.0f} (in {self.lead:.0f} steps)"
        head += f", strength {self.strength:.2f}"
        if self.units:
            head += f", units {list(self.units)}"
        return head

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (``kind`` as its string value)."""
        return {
            "kind": self.kind.value,
            "group": self.group,
            "channel": self.channel,
            "step": int(self.step),
            "predicted_step": float(self.predicted_step),
            "strength": float(self.strength),
            "units": list(self.units),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShockEvent:
        """Inverse of :meth:`to_dict`."""
        return cls(
            EventKind(d["kind"]),
            str(d["group"]),
            str(d["channel"]),
            int(d["step"]),
            float(d["predicted_step"]),
            float(d["strength"]),
            tuple(int(u) for u in d.get("units", ())),
        )
