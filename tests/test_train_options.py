# ruff: noqa: F811  (the fixtures imported from test_train are parameters here)
"""The frozen-cache training options (issue 16): every caption per step, extra negatives from the cache, the sigmoid
loss, and a locked trunk trained on cached image features; each resumes exactly and eval accepts its runs."""

import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import write_random_text_cache
from test_train import DIM, N_IMAGES, config, data, metrics, one_thread, record_steps  # noqa: F401 (fixtures)
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
        position = (b.negatives[0]["cycle"], b.negatives[0]["position"])
        assert b.negatives == a.negatives and position == divmod(6 * count, 80)
    else:
        assert b.negatives is None and "negatives" not in torch.load(list_checkpoints(tmp_path / "resumed")[-1],
                                                                     weights_only=True)


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
    stream = ExtraNegatives(cache, 30, seed=0, rank=0)
    first = [stream.draw() for _ in range(2)]  # 60 of the 80 rows
    drawn = torch.cat([v for v, _ in first]).float()
    # Within a pass no row comes twice: 60 distinct rows of the cache.
    assert len({tuple(r.tolist()) for r in drawn}) == 60
    state = stream.state_dict()
    later = stream.draw()
    other = ExtraNegatives(cache, 30, seed=0, rank=0)
    other.load_state_dict(state)
    torch.testing.assert_close(other.draw()[0], later[0])  # crosses into the next pass identically
    assert not torch.equal(ExtraNegatives(cache, 30, seed=0, rank=1).draw()[0], first[0][0])  # ranks differ
    with pytest.raises(UserError, match="same --extra-negatives"):
        ExtraNegatives(cache, 10, seed=0, rank=0).load_state_dict(state)


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
    assert a.step == b.step == 6 and a.loader[0]["signature"]["kind"] == "features"
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
    a, b = ExtraNegatives(mine, 5, seed=1, rank=0).draw(), ExtraNegatives(other, 5, seed=1, rank=0).draw()
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])
