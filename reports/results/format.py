"""How the page writes numbers, rows and tables (markdown)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from reports.results.rows import Z95, Row, finite


def fmt_loss(loss: float | None) -> str:
    if loss is None:
        return "-"
    return f"{loss:+.0f}%" if abs(loss) >= 100 else f"{loss:+.2f}%"


def fmt_pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def fmt_quality(row: Row) -> str:
    """Perplexity as logged; a probe accuracy with its 95% interval (or "n unknown")."""
    q = row.quality
    if q is None:
        return "-"
    if row.quality_kind == "perplexity":
        return f"ppl {q:.2f}"
    se = row.accuracy_stderr
    return f"acc {q:.4f} (n unknown)" if se is None else f"acc {q:.3f} ±{Z95 * se:.3f}"


def fmt_points(fraction: float) -> str:
    """An accuracy difference (a fraction) in percentage points."""
    return f"{100 * fraction:.1f} pt"


def fmt_budget(budget: float) -> str:
    return f"{100 * budget:.1f}%".replace(".0%", "%")


def fmt_number(value: Any, fmt: str) -> str:
    """A finite number through fmt, else "-"."""
    v = finite(value)
    return "-" if v is None else fmt.format(v)


def loss_title(rows: Iterable[Row]) -> str:
    """What "quality loss" means for these rows."""
    kinds = {r.quality_kind for r in rows}
    if kinds == {"accuracy"}:
        return "accuracy drop vs dense, %"
    return "perplexity increase vs dense, %"


def setting_text(setting: str) -> str:
    return setting if setting else "default recipe options"


def table(head: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """A markdown table (pipes in cells escaped)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    """A file-name-safe form of a model name (plot files)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"
