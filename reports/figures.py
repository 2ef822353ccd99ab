"""matplotlib for every chart: the Agg backend (no display) and atomic PNG writes, so an
interrupted run never leaves a half-written image for MLflow or the results page to pick up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ffsplit.files import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out_png: str | Path, dpi: int = 120) -> Path:
    """Write the figure as a PNG atomically (temp file + rename) and close it."""
    out = Path(out_png)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return out
