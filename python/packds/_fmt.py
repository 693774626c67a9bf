"""Small formatting helpers shared by the CLI, staging and the demo."""

from __future__ import annotations


def human(n: float) -> str:
    """Bytes in binary units: ``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
