"""`clipcoco train` end to end on generated shards + a text cache: exact resume, 2-rank DDP, eval, refusals, CLI."""

import errno
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cache_metadata, children, clipcoco, edit_captions, torchrun, write_coco, write_random_text_cache
from typer.testing import CliRunner

import clip.train as train_module
from cli.main import app
from clip.checkpoint import Checkpoint, list_checkpoints
from clip.config import ModelConfig, load_config
from clip.model import build_model
from clip.optim import lr_factor, param_groups
from pipeline.errors import UserError
from pipeline.shards import build_shards

DIM = 8
N_IMAGES = 16
def write_text_cache(shards: Path, path: Path, *, drop_images: int = 0, **metadata) -> Path:
    return write_random_text_cache(shards, path, dim=DIM, drop_images=drop_images,
                                   metadata=cache_metadata(DIM, **metadata))


@pytest.fixture(autouse=True)
def one_thread():
    # These tests time nothing; one intra-op thread keeps them quick on a shared, oversubscribed CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    annotations, images = write_coco(root / "coco", N_IMAGES, size=(48, 40))
    build_shards(out=root / "shards", images=images, annotations=annotations, samples_per_shard=10, progress=False)
    return {"root": root, "shards": root / "shards", "text": write_text_cache(root / "shards", root / "text.parquet")}


def config(data: dict, **overrides):
    flat = {"data.shards": str(data["shards"]), "data.text": str(data["text"]), "data.image_size": 32,
            "data.loader": "torch", "data.threads": 1, "model.image_model": "resnet18", "model.image_weights": "none",
            "model.embed_dim": 16, "train.batch_size": 4, "train.steps": 6, "train.device": "cpu",
            "train.log_every": 1, "train.save_every": 3, "optim.warmup_steps": 2, "optim.lr": 1e-3}
    return load_config(None, {**flat, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def record_steps(monkeypatch):
    """[(image ids, loss)] of every train_step call; `kill_at` raises KeyboardInterrupt in that call instead."""
    calls, state = [], {"kill_at": None}
    step, loader = train_module.train_step, train_module.make_loader

    class Recorder:  # wraps the real loader to see which image ids feed each step
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __iter__(self):
            for batch in self.inner:
                state["ids"] = batch.image_ids.tolist()
                yield batch

    def recorded_step(*args, **kwargs):
        if len(calls) + 1 == state["kill_at"]:
            raise KeyboardInterrupt
        loss = step(*args, **kwargs)
        calls.append((state["ids"], loss.item()))
        return loss

    monkeypatch.setattr(train_module, "train_step", recorded_step)
    monkeypatch.setattr(train_module, "make_loader", lambda *a, **k: Recorder(loader(*a, **k)))
    return calls, state


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_exact_resume_after_a_kill(data, tmp_path, record_steps, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    calls, state = record_steps
    cfg = config(data, **{"data.loader": loader})  # 6 steps, 4 per epoch: the resumed part crosses an epoch end
    train_module.train(cfg, out=tmp_path / "straight", progress=False)
    straight = list(calls)
    calls.clear()

    state["kill_at"] = 5  # dies in step 5, after the checkpoint of step 3
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, out=tmp_path / "resumed", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_00000003.pt"]
    state["kill_at"] = None
    before_kill = calls[:3]
    calls.clear()
    result = train_module.train(cfg, out=tmp_path / "resumed", progress=False)

    assert result["step"] == 6 and result["epoch"] == 1
    assert [ids for ids, _ in before_kill + calls] == [ids for ids, _ in straight]
    np.testing.assert_allclose([loss for _, loss in before_kill + calls], [loss for _, loss in straight], rtol=1e-5)
    # Steps logged continue (step 4, logged before the kill, was dropped on resume and logged again).
    logged = metrics(tmp_path / "resumed")
    assert [m["step"] for m in logged if m["kind"] == "train"] == list(range(1, 7))
    assert [(m["step"], m["dropped_per_epoch"]) for m in logged if m["kind"] == "start"] == [(0, 0), (3, 0)]
    ckpt = Checkpoint.load(tmp_path / "resumed")
    assert ckpt.step == 6 and ckpt.samples_seen == 24 and ckpt.state["loader"][0]["epoch"] == 1
    assert sorted(ckpt.to_dict()) == sorted(["model", "optimizer", "scheduler", "step", "epoch", "samples_seen", "rng",
                                   "loader", "config", "text_fingerprint", "text_dim", "shards_fingerprint",
                                   "train_image_ids", "text_model_path"])
    assert ckpt.text_model_path == "tiny-random"  # the cache's model_path, here its (older) model field


def test_run_directory_metrics_and_eval(data, tmp_path):
    out = tmp_path / "run"
    cfg = config(data, **{"train.steps": 2, "train.save_every": 1, "train.keep_last": 1, "train.log_every": 2,
                          "data.eval_shards": str(data["shards"]), "data.eval_text": str(data["text"]),
                          "train.eval_every": 1})
    result = train_module.train(cfg, out=out, progress=False)
    assert load_config(out / "config.yaml") == cfg
    lines = metrics(out)
    assert [(m["kind"], m["step"]) for m in lines] == [("start", 0), ("eval", 1), ("train", 2), ("eval", 2)]
    lines = lines[2:]
    assert set(lines[0]) == {"kind", "step", "epoch", "loss", "lr", "temperature", "images_per_s", "data_wait",
                             "peak_mem_gb"}
    assert 0 <= lines[0]["data_wait"] <= 1 and lines[0]["images_per_s"] > 0
    assert lines[0]["temperature"] == pytest.approx(0.07, rel=0.05)
    assert lines[1]["n_images"] == N_IMAGES and 0 <= lines[1]["i2t_r1"] <= 100
    assert result["eval"] == {k: v for k, v in lines[1].items() if k not in ("kind", "step")}
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt"]  # keep_last 1
    ckpt = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert ckpt["train_image_ids"].tolist() == list(range(1, N_IMAGES + 1))


def differences(a, b, where: str = "") -> list[str]:
    """Where two saved values differ: dicts and lists item by item, tensors bit for bit (dtype and shape too)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [where]
    return [] if a == b else [where]


RANK_OPTIONS = {  # every option of the recipe in two 2-rank runs (extra negatives: 4 per rank)
    "all captions, sigmoid": {"train.captions": "all", "model.loss": "sigmoid"},
    "one caption, extra negatives": {"train.captions": "one", "train.extra_negatives": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("options", list(RANK_OPTIONS.values()), ids=list(RANK_OPTIONS))
def test_two_rank_run_stopped_mid_epoch_resumes_exactly(data, tmp_path, options):
    """Under torchrun, a SIGTERM that reaches rank 1 only during step 3 (of 4 per epoch) stops every rank after it;
    resumed to step 6, the run ends bit-identical to an uninterrupted one: every step's images and loss, each rank's
    global RNG, caption generator, loader and extra-negative positions, and the whole last checkpoint."""
    code, stderr = torchrun(Path(__file__).with_name("train_ranks.py"), str(data["shards"]), str(data["text"]),
                            str(tmp_path), json.dumps(options))
    assert code == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # DDP: the ranks read disjoint shares of an epoch (steps 1-4), which cover the split: 16 images, 2 ranks x 4 full
    # batches of 2 (nothing dropped); they step on one global loss.
    seen = [{i for ids, _ in r["straight"]["steps"][:4] for i in ids} for r in ranks]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(1, N_IMAGES + 1))
    assert [loss for _, loss in ranks[0]["straight"]["steps"]] == [loss for _, loss in ranks[1]["straight"]["steps"]]
    assert ranks[0]["stopped"].startswith("stopped by a stop signal on another rank after step 3 of 6: saved ")
    assert ranks[1]["stopped"] == ""  # rank 0 alone prints
    for rank in ranks:
        assert rank["resumed"] == rank["straight"]
        assert len(rank["straight"]["steps"]) == 6 and rank["straight"]["loader"]["epoch"] == 1
    if options.get("train.extra_negatives"):
        per_rank = options["train.extra_negatives"] // 2
        assert [r["straight"]["negatives"]["position"] for r in ranks] == [6 * per_rank] * 2
    stopped, resumed = (list_checkpoints(tmp_path / "resumed")[i] for i in (0, -1))
    assert (stopped.name, resumed.name) == ("step_00000003.pt", "step_00000006.pt")
    a = torch.load(list_checkpoints(tmp_path / "straight")[-1], weights_only=True)
    b = torch.load(resumed, weights_only=True)
    # The scheduler is rebuilt at the resumed step (only its call count differs; its lr and step are compared).
    for ckpt in (a, b):
        del ckpt["scheduler"]["_step_count"]
    assert differences(a, b) == []
    ckpt = Checkpoint.load(tmp_path / "resumed")
    assert len(ckpt.state["loader"]) == 2 and ckpt.samples_seen == 6 * 2 * 2
    rng = ckpt.state["rng"]
    assert rng["torch"].shape[0] == rng["captions"].shape[0] == 2
    assert not torch.equal(rng["captions"][0], rng["captions"][1])  # each rank's own stream


def test_a_checkpoint_with_one_global_rng_state_resumes(data, tmp_path, monkeypatch):
    """Checkpoints written before the global RNG was saved per rank hold one state ([N], not [world, N]): a resume
    restores it on every rank."""
    run = tmp_path / "run"
    train_module.train(config(data, **{"train.steps": 2}), out=run, progress=False)
    path = list_checkpoints(run)[-1]
    saved = torch.load(path, weights_only=True)
    assert saved["rng"]["torch"].shape[0] == 1
    saved["rng"]["torch"] = saved["rng"]["torch"][0].clone()
    torch.save(saved, path)
    restored, build_run = [], train_module.build_run

    def recording_build_run(*args, **kwargs):
        built = build_run(*args, **kwargs)
        restored.append(torch.get_rng_state())
        return built

    monkeypatch.setattr(train_module, "build_run", recording_build_run)
    train_module.train(config(data, **{"train.steps": 3}), out=run, progress=False)
    assert torch.equal(restored[0], saved["rng"]["torch"])
    resumed = Checkpoint.load(run)
    assert resumed.step == 3 and resumed.state["rng"]["torch"].shape == (1, *restored[0].shape)


class StepCounter:
    """A toy stateful part of a run: how many steps it has seen."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def test_a_part_added_to_the_run_is_saved_and_restored(data, tmp_path, monkeypatch):
    """A new stateful part needs only `Run.add`, nothing in the checkpoint code or save/resume: every checkpoint holds
    its state and a resume restores it; a checkpoint saved without it is refused in one line naming it."""
    plain, run = tmp_path / "plain", tmp_path / "run"
    train_module.train(config(data, **{"train.steps": 2}), out=plain, progress=False)
    counters, build_run, step = [], train_module.build_run, train_module.train_step

    def with_counter(*args, **kwargs):
        built = build_run(*args, **kwargs)
        counters.append(built.add("counter", StepCounter()))
        return built

    def counted_step(*args, **kwargs):
        counters[-1].steps += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_run", with_counter)
    monkeypatch.setattr(train_module, "train_step", counted_step)
    train_module.train(config(data, **{"train.steps": 3}), out=run, progress=False)
    assert Checkpoint.load(run).state["counter"] == {"steps": 3}
    train_module.train(config(data, **{"train.steps": 5}), out=run, progress=False)
    assert counters[-1].steps == 5  # restored to 3, then two more steps
    assert Checkpoint.load(run).state["counter"] == {"steps": 5}
    with pytest.raises(UserError, match=f"{plain}'s checkpoint holds no counter state") as err:
        train_module.train(config(data, **{"train.steps": 3}), out=plain)
    assert len(str(err.value).splitlines()) == 1


@pytest.fixture(scope="module")
def finished_run(data) -> Path:
    out = data["root"] / "finished"
    train_module.train(config(data, **{"train.steps": 1}), out=out, progress=False)
    return out


def test_refuses_shards_without_manifest(data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="clipcoco shards"):
        train_module.train(config(data, **{"data.shards": str(tmp_path / "empty")}), out=tmp_path / "r")


def test_refuses_text_cache_missing_images(data, tmp_path):
    partial = write_text_cache(data["shards"], tmp_path / "partial.parquet", drop_images=3)
    with pytest.raises(UserError, match="3 of 16 image ids have no caption"):
        train_module.train(config(data, **{"data.text": str(partial)}), out=tmp_path / "r")


def test_refuses_resume_with_another_text_cache(data, tmp_path, finished_run):
    other = write_text_cache(data["shards"], tmp_path / "other.parquet", weights_sha256="x" * 64)
    with pytest.raises(UserError, match="is not the one .* was trained with .*weights_sha256"):
        train_module.train(config(data, **{"data.text": str(other), "train.steps": 2}), out=finished_run)


def test_refuses_other_model_shape_unless_overwrite(data, finished_run):
    cfg = config(data, **{"model.embed_dim": 32, "train.steps": 1})
    with pytest.raises(UserError, match="different model .*--overwrite"):
        train_module.train(cfg, out=finished_run)
    train_module.train(cfg, out=finished_run, overwrite=True, progress=False)
    assert Checkpoint.load(finished_run).config["model"]["embed_dim"] == 32
    assert [(m["kind"], m["step"]) for m in metrics(finished_run)] == [("start", 0), ("train", 1)]


def test_refuses_dali_when_not_installed(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(UserError, match=r"clipcoco\[dali\]"):
        train_module.train(config(data, **{"data.loader": "dali"}), out=tmp_path / "r")


def test_cli_trains_then_resumes_to_a_new_target(data, tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text("data:\n  threads: 1\ntrain:\n  log_every: 1\n")
    args = ["train", "--config", str(preset), "--shards", str(data["shards"]), "--text", str(data["text"]),
            "--out", str(tmp_path / "run"), "--image-model", "resnet18", "--image-weights", "none",
            "--image-size", "32", "--embed-dim", "16", "--head", "mlp", "--batch-size", "4", "--loader", "torch",
            "--device", "cpu", "--precision", "fp32", "--no-compile", "--warmup-steps", "1", "--no-progress"]
    first = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, [*args, "--steps", "2", "--lr", "1e-3"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.output.strip().splitlines()[-1])["step"] == 2
    assert [m["step"] for m in metrics(tmp_path / "run") if m["kind"] == "train"] == [1, 2]
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.model.head, saved.optim.lr, saved.train.steps, saved.data.threads) == ("mlp", 1e-3, 2, 1)


def test_cli_warns_of_endless_warmup_and_a_finished_run_says_so(data, tmp_path):
    args = _train_args(data, tmp_path / "run")
    first = CliRunner().invoke(app, [*args, "--steps", "2"])  # the default warmup: 500 steps
    assert first.exit_code == 0, first.output
    assert ("warning: optim.warmup_steps 500 >= the run's 2 steps: the learning rate never leaves warmup; pass "
            "--warmup-steps below 2\n") in first.stderr
    again = CliRunner().invoke(app, [*args, "--steps", "2"])
    assert again.exit_code == 0, again.output
    assert f"{tmp_path / 'run'} is already at its target step 2; nothing to do" in again.stderr
    assert "warning" not in again.stderr and "train step" not in again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["checkpoint"] == str(
        tmp_path / "run" / "checkpoints" / "step_00000002.pt")
    fewer = CliRunner().invoke(app, [*args, "--steps", "1"])
    assert fewer.exit_code == 0 and "is already at step 2, past its target 1; nothing to do" in fewer.stderr
    assert [m["step"] for m in metrics(tmp_path / "run") if m["kind"] == "train"] == [1, 2]  # nothing rewritten
    assert "resuming" not in fewer.stderr
    more = CliRunner().invoke(app, [*args, "--steps", "3"])  # a larger target continues
    assert more.exit_code == 0 and json.loads(more.stdout.strip().splitlines()[-1])["step"] == 3
    # config.yaml is rewritten with the new target, so the printed resume command would stop there: said on screen
    run = tmp_path / "run"
    assert f"resuming {run} at step 2 with train.steps 2 -> 3; {run / 'config.yaml'} now holds them\n" in more.stderr


def test_a_path_that_does_not_open_names_where_it_came_from(data, tmp_path, monkeypatch, capsys):
    from test_cli import run_main

    args = _train_args(data, tmp_path / "run")
    # Only what is missing is asked for.
    code, err = run_main(monkeypatch, capsys, *[a for a in args if a not in ("--text", str(data["text"]))])
    assert code == 2 and "no training data: pass --text FILE (from `clipcoco embed-text`)\n" in err
    assert "--shards DIR" not in err
    # The preset names Karpathy eval shards that are not here: the error says the preset gave that path.
    code, err = run_main(monkeypatch, capsys, *args, "--config", "coco-karpathy", "--image-weights", "none")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("no manifest.json in data/shards/karpathy-test" in err and "(data.eval_shards data/shards/karpathy-test "
            "came from --config coco-karpathy: pass --eval-shards to use another)" in err), err
    code, err = run_main(monkeypatch, capsys, *args, "--set", f"data.image_features={tmp_path / 'f.parquet'}",
                         "--lock-image")
    assert code == 2 and "came from --set data.image_features: pass --image-features to use another" in err, err
    assert not (tmp_path / "run").exists()


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    factors = [lr_factor(s, warmup=4, total=12) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[8] == pytest.approx(0.5) and factors[11] == pytest.approx(0.0380602)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))


def test_no_weight_decay_on_biases_norms_and_temperature():
    model = build_model(ModelConfig(image_model="resnet18", image_weights="none", embed_dim=8), DIM)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"log_logit_scale", "trunk.bn1.weight", "trunk.bn1.bias", "image_head.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if n not in skipped}
    assert "trunk.conv1.weight" not in skipped and "image_head.weight" not in skipped


@pytest.mark.gpu
def test_gpu_bf16_dali_run_resumes(data, tmp_path):
    pytest.importorskip("nvidia.dali")
    gpu = {"train.device": "cuda", "train.precision": "bf16", "data.loader": "dali", "data.image_size": 64,
           "train.save_every": 2}
    first = train_module.train(config(data, **gpu, **{"train.steps": 3}), out=tmp_path / "run", progress=False)
    resumed = train_module.train(config(data, **gpu, **{"train.steps": 5}), out=tmp_path / "run", progress=False)
    logged = [m for m in metrics(tmp_path / "run") if m["kind"] == "train"]
    assert first["step"] == 3 and resumed["step"] == 5 and [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(m["loss"]) and m["peak_mem_gb"] > 0 for m in logged)
    assert Checkpoint.load(tmp_path / "run").model["trunk.conv1.weight"].dtype == torch.float32


def test_imagenet_weights_without_network_is_one_line_and_writes_nothing(data, tmp_path, monkeypatch):
    from urllib.error import URLError

    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError, match=r"--image-weights none .*--image-weights PATH .*TORCH_HOME") as err:
        train_module.train(config(data, **{"model.image_weights": "imagenet"}), out=tmp_path / "run", progress=False)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "run").exists()  # checked before the run directory is written


@pytest.mark.parametrize("poison", ["loss", "weights"])
def test_a_non_finite_loss_or_weight_stops_without_saving_it(data, tmp_path, monkeypatch, poison):
    """NaN from step 4 on: the step-2 checkpoint stays the latest, one line names the step and the last finite loss."""
    real_step, calls = train_module.train_step, []

    def diverging_step(model, *args, **kwargs):
        loss = real_step(model, *args, **kwargs)
        calls.append(loss.item())
        if len(calls) == 4:
            with torch.no_grad():  # the weights go bad in step 4's update; with "loss", its loss shows it too
                next(model.parameters()).fill_(math.nan)
            return torch.tensor(math.nan) if poison == "loss" else loss
        return loss

    monkeypatch.setattr(train_module, "train_step", diverging_step)
    cfg = config(data, **{"train.save_every": 2, "train.log_every": 3})  # steps 1-3 logged, 4 due for a save
    with pytest.raises(UserError) as err:
        train_module.train(cfg, out=tmp_path / "run", progress=False)
    assert multiprocessing.active_children() == []  # the loader's workers ended with the run, though `err` holds it
    what, last = (("the training loss became nan at step 4", 3) if poison == "loss"
                  else ("the weights became NaN/Inf by step 4", 4))  # step 4's loss was still finite
    assert str(err.value).startswith(f"{what} (last finite loss {calls[last - 1]:.4f} at step {last}); stopped "
                                     "without saving it: rerun with the same --out to resume from step_00000002.pt "
                                     "and a lower --lr (now 0.001)")
    assert len(str(err.value).splitlines()) == 1
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002.pt"]
    assert Checkpoint.load(tmp_path / "run").step == 2  # finite weights: Checkpoint.load would refuse others
    assert [m["step"] for m in metrics(tmp_path / "run") if m["kind"] == "train"] == [3]


def test_resume_applies_a_new_lr_and_weight_decay_and_refuses_an_initial_setting(data, tmp_path):
    out = tmp_path / "run"
    train_module.train(config(data, **{"train.steps": 2}), out=out, progress=False)
    first_config = (out / "config.yaml").read_text()
    # The initial temperature only acts when a run starts: refused in one line, nothing rewritten.
    with pytest.raises(UserError, match=r"started with model.init_temperature 0.07 \(this config: 0.05\), which only "
                                        r"acts when a run starts: pass the run's value .* or pass --overwrite") as err:
        train_module.train(config(data, **{"train.steps": 4, "model.init_temperature": 0.05}), out=out)
    assert len(str(err.value).splitlines()) == 1 and (out / "config.yaml").read_text() == first_config
    # A new peak lr and weight decay: the optimizer uses them, on the schedule rebuilt from them.
    cfg = config(data, **{"train.steps": 4, "optim.lr": 5e-4, "optim.weight_decay": 0.05})
    train_module.train(cfg, out=out, progress=False)
    lrs = {m["step"]: m["lr"] for m in metrics(out) if m["kind"] == "train"}
    want = [5e-4 * lr_factor(s - 1, warmup=2, total=4) for s in (3, 4)]
    assert [lrs[s] for s in (3, 4)] == pytest.approx(want, rel=1e-12)
    assert [lrs[s] for s in (1, 2)] == pytest.approx([1e-3 * lr_factor(s - 1, warmup=2, total=2)
                                                      for s in (1, 2)], rel=1e-12)
    groups = Checkpoint.load(out).state["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(5e-4, 0.05), (5e-4, 0.0)]
    assert groups[0]["lr"] == pytest.approx(5e-4 * lr_factor(4, warmup=2, total=4), abs=1e-15)
    assert load_config(out / "config.yaml") == cfg  # config.yaml says what the optimizer used
    starts = [m for m in metrics(out) if m["kind"] == "start"]
    assert "changed" not in starts[0]
    assert starts[1]["changed"] == {"optim.lr": [1e-3, 5e-4], "optim.weight_decay": [0.1, 0.05],
                                    "train.steps": [2, 4]}


def test_a_changed_loader_setting_on_resume_is_one_line(data, tmp_path):
    train_module.train(config(data, **{"train.steps": 3}), out=tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="different loader .batch_size differ.") as err:
        train_module.train(config(data, **{"train.steps": 6, "train.batch_size": 8}), out=tmp_path / "run")
    assert len(str(err.value).splitlines()) == 1


def test_a_cache_of_edited_captions_is_refused_in_one_line(tmp_path):
    annotations, images = write_coco(tmp_path / "coco", 8, captions_per_image=2, size=(32, 32))
    shards = tmp_path / "shards"
    build_shards(out=shards, images=images, annotations=annotations, workers=1, progress=False)
    text = write_text_cache(shards, tmp_path / "text.parquet")
    edit_captions(annotations, 5)
    build_shards(out=shards, images=images, annotations=annotations, workers=1, overwrite=True, progress=False)
    code, stderr = clipcoco(*train_args(shards, text, tmp_path / "run"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"the text cache {text} was made from other captions than {shards}/captions.parquet holds (5 of its 16 " \
           "captions are not in the cache as they are" in stderr
    assert f"rerun `clipcoco embed-text {shards} --model tiny-random --pooling mean --max-length 77`" in stderr
    assert not (tmp_path / "run").exists()


def train_args(shards: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(shards), "--text", str(text), "--out", str(out), "--image-model", "resnet18",
            "--image-weights", "none", "--image-size", "32", "--embed-dim", "16", "--batch-size", "4", "--loader",
            "torch", "--device", "cpu", "--warmup-steps", "0", "--steps", "1", "--set", "data.threads=1",
            "--no-progress", *extra]


def test_bad_outputs_and_a_damaged_captions_file_are_one_line(data, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="--out .*file is a file: pass a folder for the run"):
        train_module.train(config(data), out=tmp_path / "file")
    code, stderr = clipcoco(*train_args(data["shards"], data["text"], tmp_path / ("x" * 300)))
    assert code == 2 and stderr.startswith(f"error: {tmp_path / ('x' * 300)}") and len(stderr.splitlines()) == 1
    assert "File name too long: a name in that path is too long for the file system" in stderr
    # A full disk when the checkpoint is written: one line naming it.
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left "
                                                                                    "on device")))
    code, stderr = clipcoco(*train_args(data["shards"], data["text"], tmp_path / "full"))
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert stderr == (f"error: {tmp_path / 'full' / 'checkpoints' / 'step_00000001.pt'}: No space left on device: "
                      "free space on that disk or write somewhere else (another --out)\n")
    monkeypatch.undo()
    # A captions.parquet cut short.
    shutil.copytree(data["shards"], tmp_path / "shards")
    captions = tmp_path / "shards" / "captions.parquet"
    captions.write_bytes(captions.read_bytes()[:-100])
    code, stderr = clipcoco(*train_args(tmp_path / "shards", data["text"], tmp_path / "run"))
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert f"{captions} cannot be read (ArrowInvalid: " in stderr and "rerun the `clipcoco shards` command" in stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line(data, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        code, stderr = clipcoco(*train_args(data["shards"], data["text"], tmp_path / "ro" / "run"))
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert "Permission denied: check its permissions" in stderr
def _train_args(data: dict, out: Path) -> list[str]:
    return ["train", "--shards", str(data["shards"]), "--text", str(data["text"]), "--out", str(out),
            "--image-model", "resnet18", "--image-weights", "none", "--image-size", "32", "--embed-dim", "16",
            "--batch-size", "4", "--loader", "torch", "--device", "cpu", "--set", "data.threads=1",
            "--set", "train.log_every=1", "--no-progress"]


def _stop_after_two_steps(command: list[str], run: Path, sig: signal.Signals, *,
                          rank: int | None = None) -> tuple[int, str]:
    """Run `command` in its own process group; once it has logged two more train steps than `run` held, send `sig`
    to the whole group, as a terminal's Ctrl-C does (with `rank`: to that torchrun rank's process alone); (exit code,
    stderr). The Python environment's scripts (clipcoco, torchrun) come first on PATH."""
    def logged() -> int:
        try:
            return sum(m["kind"] == "train" for m in metrics(run))
        except (OSError, json.JSONDecodeError):  # not written yet, or a line half written
            return 0

    before = logged()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while logged() < before + 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:  # ended on its own: what it said tells why
            pass
        elif rank is None:
            os.killpg(proc.pid, sig)
        else:
            os.kill(_rank_pid(proc.pid, rank), sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *children(proc.pid)]:
                os.killpg(pid, signal.SIGKILL)
    return proc.returncode, stderr


def _rank_pid(launcher: int, rank: int) -> int:
    """The process of torchrun's worker of `rank` (found by the RANK variable torchrun gave it)."""
    for pid in children(launcher):
        if f"RANK={rank}" in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0"):
            return pid
    raise AssertionError(f"torchrun ({launcher}) has no process of rank {rank}")


@pytest.mark.slow
def test_sigint_then_sigterm_checkpoint_the_step_and_resume_exactly(data, tmp_path, record_steps, monkeypatch,
                                                                     capsys):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) finishes the step, checkpoints it, prints the
    command that continues, exits 130; the printed command, stopped by SIGTERM (here raised in this process during
    a step, through the real entry point), does the same; and the interrupted run holds the very weights and losses
    of one that was never interrupted."""
    from test_cli import run_main

    run = tmp_path / "run"
    pattern = (r"stopped by {} after step (\d+) of 400: saved (\S+); to continue exactly where it stopped, run: "
               r"clipcoco (train --config \S+ --out \S+)")

    def stopped(sig: signal.Signals, code: int, stderr: str) -> list[str]:
        assert code == 130, stderr[-3000:]
        found = re.search(pattern.format(sig.name), stderr)
        assert found is not None and "Traceback" not in stderr, stderr[-3000:]
        step, saved = int(found.group(1)), Path(found.group(2))
        assert saved == run / "checkpoints" / f"step_{step:08d}.pt" and Checkpoint.load(run).step == step
        assert [m["step"] for m in metrics(run) if m["kind"] == "train"] == list(range(1, step + 1))
        stops.append(step)
        return found.group(3).split() + ["--no-progress"]

    stops = []
    command = stopped(signal.SIGINT, *_stop_after_two_steps([sys.executable, "-m", "cli.main", *_train_args(data, run),
                                                             "--warmup-steps", "2", "--steps", "400"], run,
                                                            signal.SIGINT))
    assert command[:4] == ["train", "--config", str(run / "config.yaml"), "--out"]
    calls, state = record_steps
    real_step = train_module.train_step

    def sigterm_in_second_step(*args, **kwargs):  # a scheduler's stop while the step runs
        loss = real_step(*args, **kwargs)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(train_module, "train_step", sigterm_in_second_step)
    capsys.readouterr()
    stopped(signal.SIGTERM, *run_main(monkeypatch, capsys, *command))
    assert stops[1] == stops[0] + 2
    monkeypatch.setattr(train_module, "train_step", real_step)
    calls.clear()

    # The same run in this process, never interrupted (killed after the step the chain stopped at).
    calls, state = record_steps
    state["kill_at"] = stops[1] + 1
    straight = tmp_path / "straight"
    CliRunner().invoke(app, [*_train_args(data, straight), "--warmup-steps", "2", "--steps", "400", "--save-every",
                             str(stops[1])])
    assert len(calls) == stops[1]
    ours, theirs = Checkpoint.load(run), Checkpoint.load(straight)
    assert ours.step == theirs.step == stops[1]
    assert all(torch.equal(ours.model[k], theirs.model[k]) for k in theirs.model)
    assert [m["loss"] for m in metrics(run) if m["kind"] == "train"] == [loss for _, loss in calls]


@pytest.mark.slow
def test_a_torchrun_stop_ends_in_one_line_and_its_command_resumes(data, tmp_path):
    """Under torchrun, a SIGTERM to rank 1's process alone stops every rank after the same step: rank 0's line saying
    how to continue is all there is, and torchrun exits 0 (a non-zero rank would be reported as a failure, and
    restarted with --max-restarts). The printed command, as a shell runs it, resumes there (every rank from its own
    state); a Ctrl-C to it (SIGINT to torchrun's process group, which torchrun forwards to the ranks) stops it the
    same way, though torchrun then prints its own SignalException traceback and exits 1, whatever the ranks do."""
    run = tmp_path / "run"
    line = (r"stopped by {} after step (\d+) of 400: saved (\S+); to continue exactly where it stopped, run: "
            r"(torchrun --nproc_per_node 2 \$\(which clipcoco\) train --config \S+ --out \S+)")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli.main"]
    code, stderr = _stop_after_two_steps([*launch, *_train_args(data, run), "--warmup-steps", "2", "--steps", "400",
                                          "--captions", "one"], run, signal.SIGTERM, rank=1)
    found = re.fullmatch(line.format("a stop signal on another rank") + "\n", stderr)
    assert code == 0 and found is not None, stderr[-3000:]
    first = int(found.group(1))
    assert Path(found.group(2)) == run / "checkpoints" / f"step_{first:08d}.pt" and Checkpoint.load(run).step == first

    code, stderr = _stop_after_two_steps(["bash", "-c", f"{found.group(3)} --no-progress"], run, signal.SIGINT)
    found = re.search(line.format("SIGINT"), stderr)
    assert found is not None and "ChildFailedError" not in stderr and stderr.count("Traceback") <= 1, stderr[-3000:]
    second = int(found.group(1))
    assert second >= first + 2 and Checkpoint.load(run).step == second
    assert [m["step"] for m in metrics(run) if m["kind"] == "train"] == list(range(1, second + 1))


def test_cli_imagenet_weights_with_the_network_unreachable(data, tmp_path, monkeypatch, capsys):
    """The default --image-weights imagenet, an empty TORCH_HOME and no network: one line, exit 2, no run folder."""
    import socket

    from cli.main import main

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    args = [a for a in _train_args(data, tmp_path / "run") if a not in ("--image-weights", "none")]
    monkeypatch.setattr(sys, "argv", ["clipcoco", *args, "--steps", "2"])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--image-weights none" in err and "--image-weights PATH" in err and "TORCH_HOME" in err
    assert "resnet18-f37072fd.pth" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_second_ctrl_c_stops_a_single_process_at_once(world_size):
    """The first SIGINT is noted (the loop saves and stops after the step); a second one aborts a single process at
    once, while with several processes (a rank aborting alone would leave the others waiting) it means the same
    stop."""
    from clip.signals import StopSignals

    torchrun = world_size > 1
    with StopSignals(announce=False, world_size=world_size) as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # never aborts: a scheduler's stop
        assert stop.received == "SIGTERM"
        if torchrun:
            signal.raise_signal(signal.SIGINT)
        else:
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
