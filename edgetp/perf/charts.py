"""PNG charts for reports (matplotlib, headless): what users would rather look at than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"compute": "#4C72B0", "allreduce": "#DD8452", "read_wait": "#C44E52",
          "other": "#8C8C8C"}
LABELS = {"compute": "compute", "allreduce": "allreduce (network)",
          "read_wait": "weight-read wait", "other": "other"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stacked_bars(ax: Any, labels: list[str], parts: list[dict[str, float]]) -> None:
    """One horizontal bar per label, split into the four parts of a token's time."""
    left = [0.0] * len(labels)
    for part, color in COLORS.items():
        widths = [p[part] for p in parts]
        ax.barh(labels, widths, left=left, color=color, label=LABELS[part])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()


def breakdown_chart(report: dict[str, Any], path: Path) -> None:
    """Stacked horizontal bars: one decode token's time on each node."""
    plt = _pyplot()
    nodes = report["nodes"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(nodes)))
    _stacked_bars(ax, [f"rank {n['rank']}" for n in nodes],
                  [n["breakdown_ms_per_token"] for n in nodes])
    mean = report["summary"]["decode_ms_per_token"]["mean"]
    ax.set_xlabel("ms per decoded token")
    ax.set_title(f"Where a token's time goes ({mean:.1f} ms/token)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.15), ncol=4, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tokens_chart(report: dict[str, Any], path: Path) -> None:
    """ms per token over the run (every decoded token of every repeat)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    offset = 0
    for i, run in enumerate(report["runs"]):
        xs = list(range(offset, offset + len(run["decode_ms"])))
        ax.plot(xs, run["decode_ms"], marker=".", linewidth=1, label=f"run {i + 1}")
        offset += len(run["decode_ms"])
    ax.set_xlabel("decoded token")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_title("Decode latency over the run")
    if len(report["runs"]) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """ms/token for every configuration of a sweep, split into the four parts (the master's)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(rows)))
    _stacked_bars(ax, [row["label"] for row in rows],
                  [row["breakdown_ms_per_token"] for row in rows])
    ax.set_xlabel("ms per decoded token (master's view)")
    ax.set_title("Sweep")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.1), ncol=4, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
