"""results.json as a markdown table and a bar chart with the bootstrap intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.evaluation.methods import METHODS
from server.evaluation.metrics import HIGHER_IS_BETTER

NOISE_WIDTH = 0.1  # about the 95% interval half-width at ~200 points of accuracy


def markdown_table(result: dict[str, Any]) -> str:
    metrics = result["metrics"]
    on_list = any("on_list" in row for row in result["methods"].values())
    folds = result.get("folds") or []
    who = f"{result['n_users']} held-out users" + (
        f" over {len(folds)} folds (" + ", ".join(f"fold {f['fold']}: {f['n_users']}" for f in folds) + ")" if folds else ""
    )
    lines = [
        f"**{result['task']}**: {who}, {result['n_points']} points; 95% intervals resample users.",
        "",
        "| method | " + " | ".join(metrics) + (" | answers on the label list" if on_list else "") + " | bytes stored per user |",
        "|---|" + "---:|" * (len(metrics) + 1 + on_list),
    ]
    for name, row in result["methods"].items():
        cells = [f"{row[m]:.3f} [{row[m + '_ci'][0]:.2f}, {row[m + '_ci'][1]:.2f}]" for m in metrics]
        if on_list:
            cells.append(f"{row.get('on_list', 0):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['per_user_bytes'].get(name, 0):,} |")
    widths = [(r[m + "_ci"][1] - r[m + "_ci"][0]) / 2 for r in result["methods"].values() for m in metrics]
    if widths and max(widths) >= NOISE_WIDTH / 2:
        lines += [
            "",
            f"Interval half-widths reach {max(widths):.2f}: differences smaller than about "
            f"{2 * max(widths):.2f} between two rows are within noise at this size.",
        ]
    lines += _comparison_lines(result)
    lines += ["", "Methods: " + "; ".join(f"`{n}`: {METHODS[n].description}" for n in result["methods"] if n in METHODS) + "."]
    return "\n".join(lines)


def reading(metric: str, diff: float, low: float, high: float) -> str:
    """What a paired difference says: ahead or behind beyond noise, or level within it."""
    better = diff if HIGHER_IS_BETTER[metric] else -diff
    if (low > 0 or high < 0) and better != 0:
        return "ahead beyond noise" if better > 0 else "behind beyond noise"
    return "level within noise" + (" (ahead in the point estimate)" if better > 0 else " (behind in the point estimate)" if better < 0 else "")


def _comparison_lines(result: dict[str, Any]) -> list[str]:
    rows = result.get("comparisons") or []  # results.json files from before paired differences have none
    if not rows:
        return []
    metrics = result["metrics"]
    lines = [
        "",
        "Paired differences (both methods on the same resampled users; 95% intervals):",
        "",
        "| comparison | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for row in rows:
        cells = [f"{row[m][0]:+.3f} [{row[m][1]:+.3f}, {row[m][2]:+.3f}]: {reading(m, *row[m])}" for m in metrics]
        lines.append(f"| `{row['first']}` - `{row['second']}` | " + " | ".join(cells) + " |")
    return lines


def bar_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    names = list(result["methods"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 + 0.6 * len(names) * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [result["methods"][n][metric] for n in names]
        lo = [v - result["methods"][n][metric + "_ci"][0] for n, v in zip(names, values)]
        hi = [result["methods"][n][metric + "_ci"][1] - v for n, v in zip(names, values)]
        colors = ["#1f77b4" if n.startswith("mta") else "#999999" for n in names]
        ax.bar(names, values, yerr=[lo, hi], capsize=3, color=colors)
        ax.set_title(f"{metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
        ax.tick_params(axis="x", rotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(f"{result['task']}: {result['n_users']} users, {result['n_points']} points, 95% user-bootstrap CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
