"""shockmon: forecast training phase transitions from symmetry-corrected observables.

The core (``symmetry``, ``observables``, ``observer``, ``tracker``, ``burgers``) needs only torch; the Lightning
callbacks are imported lazily, so ``import shockmon`` works without Lightning installed.
"""

from __future__ import annotations

from typing import Any

from shockmon.events import EventKind, ShockEvent

__version__ = "0.1.0"

__all__ = [
    "AttentionHeads",
    "BurgersTracker",
    "EventKind",
    "NormScale",
    "Observer",
    "Rescaling",
    "ShockEarlyStopping",
    "ShockEvent",
    "ShockMonitor",
    "SymmetryReport",
    "burgers",
    "discover",
]

_LAZY = {
    "discover": "shockmon.symmetry",
    "SymmetryReport": "shockmon.symmetry",
    "AttentionHeads": "shockmon.symmetry",
    "Rescaling": "shockmon.symmetry",
    "NormScale": "shockmon.symmetry",
    "Observer": "shockmon.observer",
    "BurgersTracker": "shockmon.tracker",
    "ShockMonitor": "shockmon.callbacks",
    "ShockEarlyStopping": "shockmon.callbacks",
    "burgers": "shockmon.burgers",
}


def __getattr__(name: str) -> Any:
    # Lazy re-exports: keeps `import shockmon` light and free of Lightning until a callback is asked for.
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name])
        value = mod if name == "burgers" else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shockmon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
