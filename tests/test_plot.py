"""`clipcoco plot`: a PNG from a metrics.jsonl, and clear errors for what is missing."""

import builtins
import json
import math

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from clip.apps.plot import curves_figure, figure_class, plot_run, read_metrics, series
from pipeline.errors import UserError


def write_metrics(run, *, steps=200, evals=(50, 100, 150, 200), truncated=False):
    lines = []
    for step in range(10, steps + 1, 10):
        lines.append({"kind": "train", "step": step, "epoch": step // 100, "loss": 5 * math.exp(-step / 80) + 0.5,
                      "lr": 5e-4 * min(1, step / 50), "temperature": 0.07 - step * 1e-4,
                      "images_per_s": 900 + step % 30, "data_wait": 0.05, "peak_mem_gb": 3.1})
        if step in evals:
            r = step / 400
            lines.append({"kind": "eval", "step": step, "i2t_r1": r, "i2t_r5": r + 0.2, "i2t_r10": r + 0.3,
                          "t2i_r1": r * 0.8, "t2i_r5": r + 0.15, "t2i_r10": r + 0.25, "mean_recall": r + 0.1})
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + ('{"kind": "train", "st' if truncated else ""))


def test_plot_writes_a_png(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, truncated=True)
    out = plot_run(run)
    assert out == run / "curves.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 600
        # not a blank canvas: the curves put many distinct colours on it
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_every_panel_labels_its_y_axis_with_the_unit(tmp_path):
    write_metrics(tmp_path)
    records = list(read_metrics((tmp_path / "metrics.jsonl").read_text().splitlines()))
    fig = curves_figure(records, figure_class(), title="run")
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "symmetric InfoNCE loss (nats)", "AdamW learning rate", "softmax temperature (no unit)",
        "images / s (all ranks)", "fraction of wall time waiting for data (0-1)", "recall (%)"]
    assert [ax.get_xlabel() for ax in fig.axes[3:]] == ["step"] * 3
    assert fig.get_suptitle() == "run (step 200)"


def test_cli_plot_to_chosen_path(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, evals=())
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_series_and_truncated_last_line():
    lines = ['{"kind": "train", "step": 1, "loss": 2.0}', '{"kind": "eval", "step": 1, "mean_recall": 0.1}',
             '{"kind": "train", "step": 2, "loss": 1.5}', '{"kind": "tr']
    records = list(read_metrics(lines))
    assert series(records, "train", "loss") == ([1, 2], [2.0, 1.5])
    assert series(records, "eval", "mean_recall") == ([1], [0.1])
    with pytest.raises(UserError, match="line 1"):
        list(read_metrics(["{bad", '{"kind": "train"}']))


def test_missing_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_run(tmp_path)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError, match=r"clipcoco\[plot\]"):
        plot_run(tmp_path)
