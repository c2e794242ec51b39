"""Training curves as PNG: the loss (and its group buckets) and, for refinement, the exposure-bias gap."""

from __future__ import annotations

import math
from typing import Any

from pipelines.core import storage


def curve_panels(history: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, metric keys) of each panel worth drawing for these rows: losses, then gaps if any."""
    keys = list(history[-1]) if history else []
    panels = [("loss", [k for k in keys if k.startswith("loss")])]
    gaps = [k for k in keys if k.startswith("gap_")]
    if gaps:
        panels.append(("exposure-bias gap (student vs teacher)", gaps))
    return [p for p in panels if p[1]]


def plot_curves(history: list[dict[str, Any]], url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Write the panels of `history` (rows with a `step`) side by side as one PNG; False when empty."""
    panels = curve_panels(history)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), dpi=100, squeeze=False)
    steps = [h["step"] for h in history]
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(steps, [h.get(key, math.nan) for h in history], label=key,
                    lw=1.8 if key in ("loss", "gap_late") else 1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        # Below the axes, so the legend never covers the curves.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(keys), 4), frameon=False)
    fig.tight_layout()
    with storage.open_atomic(url, "wb", storage_options) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True
