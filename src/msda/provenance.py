"""Provenance: the versions and settings that made an output (weights, tables, runs, maps)."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any


def provenance(**settings: Any) -> dict[str, Any]:
    """When and with which versions an output was made, with the settings that made it."""
    import torch

    from msda import __version__

    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "msda": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **settings,
    }
