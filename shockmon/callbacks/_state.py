"""Versioned callback state: the check both callbacks run when a checkpoint is restored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_state_version(owner: str, state_dict: Mapping[str, Any], current: int) -> int:
    """The ``version`` of a callback's ``state_dict``; a checkpoint without the field is version 0 (the same
    layout, written before it existed); a version this shockmon cannot read is a clear error.

    Example:
        >>> check_state_version("ShockMonitor", {}, 1)
        0
        >>> check_state_version("ShockMonitor", {"version": 2}, 1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ShockMonitor state version 2 is not supported by this shockmon (it reads versions 0 to 1); ...
    """
    version = state_dict.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= current:
        raise ValueError(
            f"{owner} state version {version!r} is not supported by this shockmon (it reads versions 0 to"
            f" {current}); resume with the shockmon that wrote the checkpoint, or without the callback's state"
        )
    return version
