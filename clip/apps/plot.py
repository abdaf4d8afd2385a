"""`clipcoco plot`: a run's training curves as one PNG.

Input: RUN_DIR/metrics.jsonl (written by `clipcoco train`), whose lines are
`{"kind": "train", "step", "epoch", "loss", "lr", "temperature", "images_per_s", "data_wait", "peak_mem_gb"}`
and `{"kind": "eval", "step", "i2t_r1", ..., "mean_recall"}`.
Output: RUN_DIR/curves.png (or --out): loss, learning rate, temperature, throughput, data wait and
eval recall against the step.

    clipcoco plot runs/coco-karpathy --out curves.png

matplotlib comes with the `plot` extra (`pip install 'clipcoco[plot]'`, included by `make install`).
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import UserError, require_extra

TRAIN_PANELS = (  # (metrics.jsonl key, panel title, y-axis label with its unit, y axis from 0: a noisy rate must
    # not look like a collapse)
    ("loss", "loss", "symmetric InfoNCE loss (nats)", False),
    ("lr", "learning rate", "AdamW learning rate", True),
    ("temperature", "temperature (1 / logit scale)", "softmax temperature (no unit)", False),
    ("images_per_s", "throughput", "images / s (all ranks)", True),
    ("data_wait", "data wait", "fraction of wall time waiting for data (0-1)", True),
)
EVAL_CURVES = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")


def figure_class():
    """matplotlib's Figure (drawn without pyplot, so no GUI backend or global state); UserError if missing."""
    require_extra("matplotlib", "plot", "drawing a PNG (plot, search, zeroshot)")
    from matplotlib.figure import Figure

    return Figure


def read_metrics(lines: Iterable[str], *, source: str = "metrics.jsonl") -> Iterator[dict]:
    """The records of a metrics.jsonl; a truncated last line (a run killed mid-write) is skipped."""
    lines = list(lines)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return
            raise UserError(f"{source} line {number} is not JSON: fix or remove that line") from None


def series(records: Iterable[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric of one kind, in file order, skipping records without it."""
    steps, values = [], []
    for record in records:
        if record.get("kind") == kind and record.get(key) is not None:
            steps.append(record["step"])
            values.append(record[key])
    return steps, values


def plot_run(run: Path, *, out: Path | None = None) -> Path:
    """Draw RUN/metrics.jsonl into one PNG (default RUN/curves.png); returns its path."""
    run = Path(run)
    Figure = figure_class()
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"no metrics.jsonl in {run}: pass a run directory written by `clipcoco train`")
    records = list(read_metrics(metrics.read_text().splitlines(), source=str(metrics)))
    if not any(r.get("kind") == "train" for r in records):
        raise UserError(f"{metrics} has no training records yet: plot again once the run has logged a step")
    out = Path(out) if out is not None else run / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    curves_figure(records, Figure, title=run.resolve().name).savefig(out, dpi=110)
    return out


def curves_figure(records: list[dict], Figure, *, title: str):
    """The curves of metrics.jsonl `records` as a matplotlib Figure: one panel per TRAIN_PANELS entry, then recall."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    for ax, (key, panel, ylabel, from_zero) in zip(axes, TRAIN_PANELS, strict=False):
        steps, values = series(records, "train", key)
        ax.plot(steps, values, color="tab:blue", linewidth=1.2)
        ax.set_title(panel)
        ax.set_ylabel(ylabel)
        if from_zero:
            ax.set_ylim(bottom=0, top=max(values) * 1.1 if values and max(values) > 0 else None)
        ax.grid(alpha=0.3)
    ax = axes[len(TRAIN_PANELS)]
    ax.set_title("eval recall")
    ax.set_ylabel("recall (%)")
    ax.grid(alpha=0.3)
    drawn = False
    for key in EVAL_CURVES:
        steps, values = series(records, "eval", key)
        if steps:
            style = {"color": "black", "linewidth": 2.2} if key == "mean_recall" else {
                "linestyle": "-" if key.startswith("i2t") else "--", "linewidth": 1.2}
            ax.plot(steps, [100 * v for v in values], marker="o", markersize=3, label=key, **style)
            drawn = True
    if drawn:
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no eval records\n(set data.eval_shards to score during training)", ha="center",
                va="center", transform=ax.transAxes, color="gray")
    for ax in axes[3:]:  # the x axis is shared: label the bottom row only
        ax.set_xlabel("step")
    last = max(r["step"] for r in records if r.get("kind") == "train")
    fig.suptitle(f"{title} (step {last})", fontsize=13)
    return fig
