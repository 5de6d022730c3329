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


def plot_gamma(results: list[dict], path: Path, title: str | None = None) -> Path:
    """Bar chart of mean γ (with ± std whiskers) for each checkpoint on one dataset."""
    plt = _pyplot()
    labels = [r["checkpoint"] for r in results]
    means = [r["mean"] for r in results]
    stds = [r["std"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(labels, means, yerr=stds, capsize=4, color=["#8c8c8c", "#4c72b0", "#dd8452", "#55a868"][: len(labels)]
                  + ["#4c72b0"] * max(0, len(labels) - 4))
    ax.bar_label(bars, labels=[f"{m:.2f}" for m in means], padding=3)
    ax.axhline(0, color="black", linewidth=0.8)
    low = min([0.0] + [m - s for m, s in zip(means, stds)])
    high = max([0.0] + [m + s for m, s in zip(means, stds)])
    ax.set_ylim(low - 0.12 * (high - low or 1), high + 0.12 * (high - low or 1))  # room for the value labels
    ax.set_xlabel("checkpoint used as reference")
    ax.set_ylabel("mean γ = log π(chosen) − log π(rejected)")
    data = results[0]["data"] if results else ""
    ax.set_title(title or f"Mean γ on {data} (sDPO Fig. 2 analogue, n={results[0]['n'] if results else 0})")
    fig.tight_layout()
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
    """One line per labelled training log (a list of logged records with 'update' and 'loss')."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, records in curves.items():
        ax.plot([r["update"] for r in records], [r["loss"] for r in records], marker="o", markersize=3, label=label)
    ax.axhline(0.693147, color="gray", linestyle="--", linewidth=0.8, label="ln 2")
    ax.set_xlabel("update (optimizer step) within the sDPO step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc=legend)
    fig.tight_layout()
    return _save(fig, path)
