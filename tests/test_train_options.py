# ruff: noqa: F811  (the fixtures imported from test_train are parameters here)
"""The frozen-cache training options (issue 16): every caption per step, extra negatives from the cache, the sigmoid
loss, and a locked trunk trained on cached image features; each resumes exactly and eval accepts its runs."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from conftest import clipcoco, write_random_text_cache
from PIL import Image
from test_train import DIM, N_IMAGES, config, data, metrics, one_thread, record_steps, train_args  # noqa: F401 (fixtures)
from typer.testing import CliRunner

import clip.train as train_module
from cli.main import app
from clip.checkpoint import Checkpoint, list_checkpoints
from clip.evaluate import evaluate
from clip.image_features import ImageFeatures, embed_shards
from clip.model import build_model
from clip.negatives import ExtraNegatives
from pipeline.errors import UserError
from pipeline.text_cache import TextCache

OPTIONS = {  # the loader, caption and negative streams of each option, and each loss, resumed exactly
    "all captions, sigmoid": {"train.captions": "all", "model.loss": "sigmoid"},
    "one caption, extra negatives": {"train.captions": "one", "train.extra_negatives": 24},
    "all captions, extra negatives": {"train.captions": "all", "train.extra_negatives": 8},
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_exact_resume_with_each_option(data, tmp_path, record_steps, options):
    calls, state = record_steps
    cfg = config(data, **options)  # 6 steps, 4 per epoch, checkpoints at 3 and 6
    train_module.train(cfg, out=tmp_path / "straight", progress=False)
    straight = list(calls)
    calls.clear()
    state["kill_at"] = 5
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, out=tmp_path / "resumed", progress=False)
    state["kill_at"] = None
    before_kill = calls[:3]
    calls.clear()
    train_module.train(cfg, out=tmp_path / "resumed", progress=False)
    assert [ids for ids, _ in before_kill + calls] == [ids for ids, _ in straight]
    np.testing.assert_allclose([loss for _, loss in before_kill + calls], [loss for _, loss in straight], rtol=1e-5)
    a, b = Checkpoint.load(tmp_path / "straight"), Checkpoint.load(tmp_path / "resumed")
    for name, tensor in a.model.items():
        torch.testing.assert_close(b.model[name], tensor, msg=name)
    if options.get("train.extra_negatives"):
        # 16 images x 5 captions = 80 rows; 6 steps of 24 (or 8) rows: the stream's position is saved per rank.
        count = options["train.extra_negatives"]
        position = (b.state["negatives"][0]["cycle"], b.state["negatives"][0]["position"])
        assert b.state["negatives"] == a.state["negatives"] and position == divmod(6 * count, 80)
    else:
        last = torch.load(list_checkpoints(tmp_path / "resumed")[-1], weights_only=True)
        assert b.state.get("negatives") is None and "negatives" not in last


def test_resume_refuses_a_changed_option(data, tmp_path):
    train_module.train(config(data, **{"train.steps": 1, "model.loss": "sigmoid"}), out=tmp_path / "run",
                       progress=False)
    with pytest.raises(UserError, match="different model .*sigmoid loss"):
        train_module.train(config(data, **{"train.steps": 2}), out=tmp_path / "run")
    train_module.train(config(data, **{"train.steps": 1}), out=tmp_path / "plain", progress=False)
    with pytest.raises(UserError, match="without --extra-negatives"):
        train_module.train(config(data, **{"train.steps": 2, "train.extra_negatives": 4}), out=tmp_path / "plain")


def test_all_captions_lays_out_every_caption_with_a_mask(tmp_path, data):
    cache = TextCache.load(data["text"])
    ids = torch.tensor([3, 1])
    rows, valid = cache.all_captions(ids, slots=6)
    assert rows.shape == (12, DIM) and valid.tolist() == [[True] * 5 + [False]] * 2
    mine = torch.from_numpy(cache.image_ids == 3)
    torch.testing.assert_close(rows[:5], cache.embeddings[mine])  # image 3's five captions, in cache order
    torch.testing.assert_close(rows[5], rows[4])  # the unused slot repeats a caption (masked in the loss)


def test_extra_negatives_stream_is_a_seeded_permutation_per_pass_and_resumes(data):
    cache = TextCache.load(data["text"])
    stream = ExtraNegatives(cache, 30, seed=0, rank=0, world_size=1)
    first = [stream.draw() for _ in range(2)]  # 60 of the 80 rows
    drawn = torch.cat([v for v, _ in first]).float()
    # Within a pass no row comes twice: 60 distinct rows of the cache.
    assert len({tuple(r.tolist()) for r in drawn}) == 60
    state = stream.state_dict()
    later = stream.draw()
    other = ExtraNegatives(cache, 30, seed=0, rank=0, world_size=1)
    other.load_state_dict(state)
    torch.testing.assert_close(other.draw()[0], later[0])  # crosses into the next pass identically
    other_rank = ExtraNegatives(cache, 30, seed=0, rank=1, world_size=2)
    assert not torch.equal(other_rank.draw()[0], first[0][0])  # ranks differ
    with pytest.raises(UserError, match="same --extra-negatives"):
        ExtraNegatives(cache, 10, seed=0, rank=0, world_size=1).load_state_dict(state)


@pytest.fixture(scope="module")
def trunk_file(data) -> str:
    # A "pretrained" trunk without a download: random resnet18 weights saved as a state dict.
    torch.manual_seed(123)
    path = data["root"] / "resnet18-trunk.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def features(data, trunk_file):
    path = data["root"] / "features.parquet"
    summary = embed_shards(data["shards"], out=path, image_model="resnet18", image_weights=trunk_file, image_size=32,
                           device="cpu", loader="torch", batch_size=5, threads=1, progress=False)
    assert summary == {"out": str(path), "rows": N_IMAGES, "dim": 512}
    return path


def locked(data, trunk_file, features, **overrides):
    return config(data, **{"model.lock_image": True, "model.image_weights": trunk_file,
                           "data.image_features": str(features), **overrides})


def test_locked_run_trains_the_heads_on_cached_features_without_decoding(data, trunk_file, features, tmp_path,
                                                                         monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a run on cached image features must not build an image loader")

    step, calls = train_module.train_step, {"n": 0, "kill_at": 5}

    def killable_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "make_loader", no_decoding)
    monkeypatch.setattr(train_module, "train_step", killable_step)
    cfg = locked(data, trunk_file, features)
    with pytest.raises(KeyboardInterrupt):  # dies in step 5, after the checkpoint of step 3
        train_module.train(cfg, out=tmp_path / "resumed", progress=False)
    calls["kill_at"] = None
    train_module.train(cfg, out=tmp_path / "resumed", progress=False)
    train_module.train(cfg, out=tmp_path / "straight", progress=False)
    a, b = Checkpoint.load(tmp_path / "straight"), Checkpoint.load(tmp_path / "resumed")
    assert a.step == b.step == 6 and a.state["loader"][0]["signature"]["kind"] == "features"
    source = torch.load(trunk_file, weights_only=True)
    for name, tensor in a.model.items():
        torch.testing.assert_close(b.model[name], tensor, msg=name)  # the resume is exact
        if name.startswith("trunk."):
            torch.testing.assert_close(tensor, source[name.removeprefix("trunk.")], msg=name)  # frozen, BN included
    torch.manual_seed(cfg.train.seed)  # the initial model, as build_run makes it
    initial = build_model(cfg.model, DIM)
    assert not torch.equal(initial.image_head.weight, a.model["image_head.weight"])  # the heads trained
    # The cached features are what the trunk gives on the eval crop: eval (which decodes) accepts the run.
    monkeypatch.undo()
    report = evaluate(tmp_path / "straight", shards=data["shards"], text=data["text"], progress=False)
    assert report["n_images"] == N_IMAGES and 0 <= report["t2i_r1"] <= 100
    cached = ImageFeatures.load(features)
    assert cached.metadata["image_weights"] == trunk_file and cached.dim == initial.feature_dim == 512


def test_feature_cache_must_fit_the_run(data, trunk_file, features, tmp_path):
    with pytest.raises(UserError, match="needs model.lock_image"):
        config(data, **{"data.image_features": str(features)})
    with pytest.raises(UserError, match="image_size: cache '32' vs run '48'"):
        train_module.train(locked(data, trunk_file, features, **{"data.image_size": 48}), out=tmp_path / "a")
    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(UserError, match="made by another trunk"):
        train_module.train(locked(data, str(other), features), out=tmp_path / "b")
    with pytest.raises(UserError, match="random trunk"):
        embed_shards(data["shards"], out=tmp_path / "f.parquet", image_weights="none")


def test_cli_embed_images_and_train_help(data, trunk_file, tmp_path):
    out = tmp_path / "feats.parquet"
    result = CliRunner().invoke(app, ["embed-images", str(data["shards"]), "--out", str(out), "--image-model",
                                      "resnet18", "--image-weights", trunk_file, "--image-size", "32", "--device",
                                      "cpu", "--loader", "torch", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["rows"] == N_IMAGES
    helped = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "240"}).output
    for flag in ("--captions", "--extra-negatives", "--loss", "--lock-image", "--image-features"):
        assert flag in helped


def test_two_caches_differ_only_where_the_rows_differ(data, tmp_path):
    # The sampler reads the cache it is given: a cache of other vectors gives other extras, the same ids.
    other = TextCache.load(write_random_text_cache(data["shards"], tmp_path / "o.parquet", dim=DIM, seed=9))
    mine = TextCache.load(data["text"])
    a, b = (ExtraNegatives(cache, 5, seed=1, rank=0, world_size=1).draw() for cache in (mine, other))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_extra_negatives_are_at_most_the_captions_of_the_cache(data):
    cache = TextCache.load(data["text"])  # 16 images x 5 captions
    ExtraNegatives(cache, 80, seed=0, rank=0, world_size=1)
    ExtraNegatives(cache, 40, seed=0, rank=1, world_size=2)
    with pytest.raises(UserError, match=r"--extra-negatives 81 is more than the 80 captions of the text cache "
                                        r".*text.parquet, so every step would repeat them: pass at most 80$"):
        ExtraNegatives(cache, 81, seed=0, rank=0, world_size=1)
    with pytest.raises(UserError, match=r"--extra-negatives 81 .*: pass at most 78 \(a multiple of the 3 processes\)"):
        ExtraNegatives(cache, 27, seed=0, rank=2, world_size=3)


@pytest.fixture(scope="module")
def bad_weights(data) -> Path:
    """Weight files that are no resnet18 state dict, or one with a NaN in a BatchNorm buffer."""
    folder = data["root"] / "bad-weights"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "photo.jpg")
    source = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({**source, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, folder / "shape.pt")
    source["bn1.running_mean"][0] = float("nan")
    torch.save(source, folder / "nan.pt")
    return folder


SEED = r"invalid config: train.seed must be in \[0, 281474976710655\] \(2\*\*48 - 1\)"
EXTRAS = r"--extra-negatives {} is more than the 80 captions of the text cache .*: pass at most 80"
REFUSED = {  # options that gave a traceback, wrote a config.yaml first, or trained a run only to refuse its checkpoints
    "negative seed": (["--seed", "-1"], SEED),
    "seed past torch's": (["--seed", str(2**70)], SEED),
    "extras of 77 GB": (["--extra-negatives", "100000000"], EXTRAS.format(100000000)),
    "extras 2**63-1": (["--extra-negatives", str(2**63 - 1)], EXTRAS.format(2**63 - 1)),
    "a NaN logit bias": (["--loss", "sigmoid", "--set", "model.init_logit_bias=nan"],
                         "invalid config: model.init_logit_bias must be a finite number, not nan"),
    "weights a JPEG": (["--image-weights", "photo.jpg"], r"photo.jpg are not a state dict torch.load reads"),
    "a misshapen tensor": (["--image-weights", "shape.pt"], r"1 of another shape \(e.g. \['layer1.0.conv1.weight'\]"),
    "a NaN BatchNorm buffer": (["--image-weights", "nan.pt"], r"hold NaN/Inf values in 1 of .*first: bn1.running_mean"),
}


@pytest.mark.parametrize("args, message", list(REFUSED.values()), ids=list(REFUSED))
def test_bad_inputs_are_one_line_before_the_run_writes_anything(data, bad_weights, tmp_path, args, message):
    args = [str(bad_weights / a) if a.endswith((".jpg", ".pt")) else a for a in args]
    code, stderr = clipcoco(*train_args(data["shards"], data["text"], tmp_path / "run", *args))
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "run").exists()


def _edit_features(features: Path, out: Path, edit) -> Path:
    """The cache with `edit` applied to its table, written with pyarrow: the schema metadata is kept."""
    pq.write_table(edit(pq.read_table(features)), out)
    return out


def _another_image(table: pa.Table) -> pa.Table:
    last = table.slice(len(table) - 1)
    return pa.concat_tables([table, last.set_column(0, "image_id", pa.array([N_IMAGES + 1], pa.int64()))])


ROWS = {  # image ids 1..16
    "a middle row missing": (lambda t: pa.concat_tables([t.slice(0, 5), t.slice(6)]), 1, 0, [6]),
    "the last row missing": (lambda t: t.slice(0, len(t) - 1), 1, 0, [16]),
    "a row of another image": (_another_image, 0, 1, [17]),
}


@pytest.mark.parametrize("edit, missing, extra, first", list(ROWS.values()), ids=list(ROWS))
def test_a_feature_cache_must_hold_each_image_of_the_shards(data, trunk_file, features, tmp_path, edit, missing,
                                                            extra, first):
    # A row taken out gave its image the next row's features (exit 0), or the last one an IndexError.
    edited = _edit_features(features, tmp_path / "edited.parquet", edit)
    with pytest.raises(UserError, match=re.escape(
            f"image-feature cache {edited} does not hold the images of {data['shards']}: {missing} of its {N_IMAGES} "
            f"images have no row and {extra} rows are of other images (first: {first}), so the file was edited or "
            f"damaged: rerun `clipcoco embed-images {data['shards']} --image-model resnet18 --image-size 32 --out "
            f"{edited}`")):
        train_module.train(locked(data, trunk_file, edited), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_feature_cache_holding_nan_is_refused_before_the_run(data, trunk_file, features, tmp_path):
    def nan_in_image_4(table: pa.Table) -> pa.Table:
        embedding = table.column("embedding").combine_chunks()
        values = embedding.flatten().to_numpy(zero_copy_only=False).copy()
        values[3 * 512 + 7] = np.nan
        column = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float16()), 512)
        return table.set_column(1, table.schema.field("embedding"), column)

    edited = _edit_features(features, tmp_path / "nan.parquet", nan_in_image_4)
    with pytest.raises(UserError, match=re.escape(f"the image-feature cache {edited} holds NaN/Inf values in 1 of its "
                                                  f"{N_IMAGES} feature vectors (first: image 4)")):
        train_module.train(locked(data, trunk_file, edited), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_the_disk_refuses_is_one_line(data, tmp_path):
    """torch.save on a real failed write (the kernel's file-size limit stands in for a full disk: both stop a file
    mid-write) gave its zip writer's "unexpected pos" traceback; now the OSError's line, and no temporary file."""
    def files_stop_at_1_mb():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out, repo = tmp_path / "run", Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "cli.main", *train_args(data["shards"], data["text"], out)],
                          capture_output=True, text=True, env=env, preexec_fn=files_stop_at_1_mb, timeout=300)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: {out / 'checkpoints' / 'step_00000001.pt'}: File too large: the file system or a limit on file size "
        "(ulimit -f) stops the file there: write somewhere else (another --out) or raise the limit\n"), proc.stderr
    assert list((out / "checkpoints").iterdir()) == []
