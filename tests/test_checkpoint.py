"""Checkpoints: weights_only round trip, `latest`, keep_last, and a save killed before its rename."""

import pytest
import torch

import clip.checkpoint as checkpoint
from clip.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from clip.config import Config, load_config
from clip.model import build_model
from pipeline.errors import UserError


def _state(step: int, cfg: Config) -> dict:
    model = build_model(cfg.model, 6)
    return {"model": model.state_dict(), "step": step, "rng": {"torch": torch.get_rng_state()},
            "config": cfg.to_dict(), "text_dim": 6, "text_fingerprint": {"model": "m"}}


@pytest.fixture
def cfg():
    return load_config(None, {"model.image_model": "resnet18", "model.image_weights": "none", "model.embed_dim": 8})


def test_round_trip_and_model_from_checkpoint(tmp_path, cfg):
    state = _state(5, cfg)
    path = save_checkpoint(tmp_path, state, keep_last=2)
    assert path.name == "step_00000005.pt" and resolve_checkpoint(tmp_path) == path
    loaded = load_checkpoint(tmp_path)
    torch.testing.assert_close(loaded["rng"]["torch"], state["rng"]["torch"])
    model = model_from_checkpoint(loaded)
    torch.testing.assert_close(model.state_dict()["image_head.weight"], state["model"]["image_head.weight"])
    assert not model.training


def test_keep_last(tmp_path, cfg):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, _state(step, cfg), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    assert resolve_checkpoint(tmp_path).name == "step_00000004.pt"


def test_killed_save_leaves_latest_loadable(tmp_path, cfg, monkeypatch):
    save_checkpoint(tmp_path, _state(1, cfg), keep_last=3)

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies after writing the temporary file, before the rename

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _state(2, cfg), keep_last=3)
    monkeypatch.undo()
    assert list((tmp_path / "checkpoints").glob(".*.tmp"))  # the half-done save is there, under its temp name
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    assert load_checkpoint(tmp_path)["step"] == 1


def test_missing_run_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="clipcoco train"):
        resolve_checkpoint(tmp_path)
