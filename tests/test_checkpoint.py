"""Checkpoints: weights_only round trip, `latest`, keep_last, and a save killed before its rename."""

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clip.checkpoint import Checkpoint, list_checkpoints, resolve_checkpoint
from clip.config import Config, load_config
from clip.model import build_model
from pipeline.errors import UserError, os_error_message


def _state(step: int, cfg: Config) -> Checkpoint:
    model = build_model(cfg.model, 6)
    return Checkpoint(model=model.state_dict(), step=step, state={"rng": {"torch": torch.get_rng_state()}},
                      config=cfg.to_dict(), text_dim=6, text_fingerprint={"model": "m"}, shards_fingerprint="s",
                      train_image_ids=torch.arange(3))


@pytest.fixture
def cfg():
    return load_config(None, {"model.image_model": "resnet18", "model.image_weights": "none", "model.embed_dim": 8})


def test_round_trip_and_model_from_checkpoint(tmp_path, cfg):
    state = _state(5, cfg)
    path = state.save(tmp_path, keep_last=2)
    assert path.name == "step_00000005.pt" and resolve_checkpoint(tmp_path) == path
    loaded = Checkpoint.load(tmp_path)
    torch.testing.assert_close(loaded.state["rng"]["torch"], state.state["rng"]["torch"])
    assert torch.load(path, weights_only=True).keys() == state.to_dict().keys()  # a plain dict on disk
    model = loaded.build_model()
    torch.testing.assert_close(model.state_dict()["image_head.weight"], state.model["image_head.weight"])
    assert not model.training


def test_keep_last(tmp_path, cfg):
    for step in (1, 2, 3, 4):
        _state(step, cfg).save(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    assert resolve_checkpoint(tmp_path).name == "step_00000004.pt"


KILLED_SAVE = """
import os, sys
import torch
from clip.checkpoint import Checkpoint
from clip.config import load_config
from clip.model import build_model

cfg = load_config(None, {"model.image_model": "resnet18", "model.image_weights": "none", "model.embed_dim": 8})
os.replace = lambda src, dst: os._exit(9)  # the process dies after writing the temporary file, before the rename
Checkpoint(model=build_model(cfg.model, 6).state_dict(), config=cfg.to_dict(), text_dim=6,
           text_fingerprint={"model": "m"}, step=2, shards_fingerprint="s",
           train_image_ids=torch.arange(3)).save(sys.argv[1], keep_last=3)
"""


def test_killed_save_leaves_latest_loadable(tmp_path, cfg):
    _state(1, cfg).save(tmp_path, keep_last=3)
    repo = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(tmp_path)], cwd=repo)
    assert killed.returncode == 9
    assert list((tmp_path / "checkpoints").glob("*.tmp"))  # the half-done save is there, under its temp name
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    assert Checkpoint.load(tmp_path).step == 1


def test_a_failed_save_removes_its_temporary_file(tmp_path, cfg, monkeypatch):
    _state(1, cfg).save(tmp_path, keep_last=3)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left") as err:
        _state(2, cfg).save(tmp_path, keep_last=3)
    # The failed write names the checkpoint, and the CLI's one line says what to do.
    assert err.value.filename == str(tmp_path / "checkpoints" / "step_00000002.pt")
    assert os_error_message(err.value) == (f"{err.value.filename}: No space left on device: free space on that disk "
                                           "or write somewhere else (another --out)")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001.pt"]
    assert Checkpoint.load(tmp_path).step == 1


FULL_SAVE = """
import resource, signal, sys
import torch
from clip.checkpoint import Checkpoint
from clip.config import load_config
from clip.model import build_model
from pipeline.errors import os_error_message

cfg = load_config(None, {"model.image_model": "resnet18", "model.image_weights": "none", "model.embed_dim": 8})
state = Checkpoint(model=build_model(cfg.model, 6).state_dict(), config=cfg.to_dict(), text_dim=6,
                   text_fingerprint={"model": "m"}, step=2, shards_fingerprint="s", train_image_ids=torch.arange(3))
# The kernel stops every file of this process at 1 MB, as a disk that fills up stops the one being written: a write
# in a tensor's data fails (EFBIG here, ENOSPC there) inside torch's zip writer.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    state.save(sys.argv[1], keep_last=3)
except OSError as err:
    print(os_error_message(err))
"""


def test_a_write_the_disk_refuses_mid_checkpoint_is_the_os_error(tmp_path, cfg):
    """torch.save itself, on a real failed write: the OSError (one line), not its writer's "unexpected pos"."""
    _state(1, cfg).save(tmp_path, keep_last=3)
    repo = Path(__file__).resolve().parents[1]
    full = subprocess.run([sys.executable, "-c", textwrap.dedent(FULL_SAVE), str(tmp_path)], cwd=repo,
                          capture_output=True, text=True)
    assert full.returncode == 0 and full.stdout == (
        f"{tmp_path / 'checkpoints' / 'step_00000002.pt'}: File too large: the file system or a limit on file size "
        "(ulimit -f) stops the file there: write somewhere else (another --out) or raise the limit\n"), full.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001.pt"]


def test_not_a_checkpoint_says_so(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    (tmp_path / "README.md").write_text("# clipcoco\n\nA data-pipeline-first trainer.\n")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    for name in ("weights.pt", "README.md", "other.pt"):
        with pytest.raises(UserError, match="is not a clipcoco checkpoint") as err:
            Checkpoint.load(tmp_path / name)
        assert "weights_only" not in str(err.value)  # never the advice to unpickle an unknown file


def test_missing_run_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="clipcoco train"):
        resolve_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_model_are_one_line(tmp_path, cfg):
    state = _state(1, cfg)
    del state.model["image_head.weight"]
    state.save(tmp_path / "missing", keep_last=1)
    with pytest.raises(UserError, match=r"damaged or not a clipcoco checkpoint: .*\(1 missing, 0 unexpected, 0 of "
                                        r"another shape; first: image_head.weight\)") as err:
        Checkpoint.load(tmp_path / "missing")
    assert len(str(err.value).splitlines()) == 1
    state = _state(1, cfg)
    state.model["image_head.weight"] = state.model["image_head.weight"][:, :3]
    state.save(tmp_path / "shape", keep_last=1)
    with pytest.raises(UserError, match="1 of another shape"):
        Checkpoint.load(tmp_path / "shape")


def test_non_finite_weights_are_refused(tmp_path, cfg):
    state = _state(1, cfg)
    state.model["image_head.weight"][0, :2] = float("nan")
    state.model["text_head.weight"][0, 0] = float("inf")
    state.save(tmp_path, keep_last=1)
    with pytest.raises(UserError, match=r"holds non-finite weights \(3 NaN/Inf values in 2 of \d+ tensors, first: "
                                        r"image_head.weight\).*earlier checkpoint"):
        Checkpoint.load(tmp_path)
