"""Pictures for reports/: mean γ per checkpoint (the paper's Fig. 2) and the loss per update of each step.

matplotlib is imported lazily with the file-only Agg backend, so no display is needed. A picture is drawn in memory
and written whole (rundir.write_bytes_atomic): a kill or a full disk never leaves half a PNG, and a full disk is the
`disk full while writing` error.
"""

from __future__ import annotations

import io
import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from sdpo_cli.errors import SdpoError
    from sdpo_cli.rundir import write_bytes_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _pyplot().close(fig)
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as e:  # not a full disk (that is an SdpoError already): a folder the user cannot write
        raise SdpoError(f"{path}: cannot write the picture ({e.strerror or e})",
                        hint="give a path in a folder you can write") from None
    return path


BASE_COLOR = "#8c8c8c"  # S, the SFT base model
STEP_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")  # M_1, M_2, ... (then again)
OTHER_COLOR = "#da8bc3"  # a model folder given by path


def plot_gamma(results: list[dict], path: Path, title: str | None = None) -> Path:
    """Bar chart of mean γ for each checkpoint on one dataset, with ± std whiskers. A legend says what the colours,
    the whiskers and a hatched bar (a stale checkpoint, gamma.staleness) mean."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    labels = [r["checkpoint"] + ("\n(stale)" if r.get("stale") else "") for r in results]
    means = [r["mean"] for r in results]
    stds = [r["std"] for r in results]
    colors, legend = [], {}
    for r in results:
        name = r["checkpoint"]
        if name == "base":
            color, text = BASE_COLOR, "base = S (SFT model)"
        elif name.startswith("step-") and name[5:].isdigit():
            color, text = STEP_COLORS[(int(name[5:]) - 1) % len(STEP_COLORS)], f"{name} = M_{name[5:]}"
        else:
            color, text = OTHER_COLOR, "another model folder"
        colors.append(color)
        legend.setdefault(text, Patch(facecolor=color, label=text))
    # constrained layout leaves room for the legend outside the axes (tight_layout would cut it off)
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    bars = ax.bar(labels, means, color=colors)
    for bar, r in zip(bars, results):
        if r.get("stale"):
            bar.set_hatch("//")
            bar.set_edgecolor("black")
    whiskers = ax.errorbar(range(len(results)), means, yerr=stds, fmt="none", ecolor="black", capsize=4,
                           label="± std of γ over the pairs")
    for x, (m, sd) in enumerate(zip(means, stds)):  # the value beyond its whisker, where nothing covers it
        ax.annotate(f"{m:.2f}", (x, m + sd if m >= 0 else m - sd), xytext=(0, 3 if m >= 0 else -3),
                    textcoords="offset points", ha="center", va="bottom" if m >= 0 else "top")
    ax.axhline(0, color="black", linewidth=0.8)
    low = min([0.0] + [m - s for m, s in zip(means, stds)])
    high = max([0.0] + [m + s for m, s in zip(means, stds)])
    ax.set_ylim(low - 0.12 * (high - low or 1), high + 0.12 * (high - low or 1))  # room for the value labels
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("mean γ = log π(chosen) − log π(rejected)")
    data = results[0]["data"] if results else ""
    ax.set_title(title or f"Mean γ on {data} (sDPO Fig. 2 analogue, n={results[0]['n'] if results else 0})")
    handles = list(legend.values()) + [whiskers]
    if any(r.get("stale") for r in results):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="stale: not what this config gives"))
    fig.legend(handles=handles, fontsize="small", loc="outside right upper")
    return _save(fig, path)


def read_log(path: Path) -> list[dict]:
    """The records of a train log. A last line cut short (a kill or a full disk while it was appended) is no record;
    reading stops there."""
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def plot_losses(curves: dict[str, list[dict]], path: Path, title: str = "DPO loss per update",
                legend: str = "best") -> Path:
    """One line per labelled training log (its train records: 'update', 'loss'), and beside it, dashed in the same
    colour, the held-out loss of its eval records ('eval/loss' after 'update' updates), where the log has them."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, records in curves.items():
        train = [r for r in records if "loss" in r]
        held_out = [r for r in records if "eval/loss" in r]
        (line,) = ax.plot([r["update"] for r in train], [r["loss"] for r in train], marker="o", markersize=3,
                          label=f"{label} train" if held_out else label)
        if held_out:
            ax.plot([r["update"] for r in held_out], [r["eval/loss"] for r in held_out], linestyle="--",
                    marker="s", markersize=3, color=line.get_color(), label=f"{label} held-out")
    ax.axhline(0.693147, color="gray", linestyle="--", linewidth=0.8, label="ln 2")
    ax.set_xlabel("update (optimizer step) within the sDPO step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc=legend)
    fig.tight_layout()
    return _save(fig, path)
