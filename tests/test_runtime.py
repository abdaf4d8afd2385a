"""The one device rule and the process-group helpers every command uses (pipeline/runtime.py)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import torchrun

from pipeline.errors import UserError
from pipeline.runtime import distributed, gather_objects, gather_rows, is_device_name, resolve_device


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_accepted_device_names(name):
    assert is_device_name(name)


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", "", "cpu:0", " cpu"])
def test_refused_device_names(name):
    assert not is_device_name(name)
    with pytest.raises(UserError, match="pass auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match="no CUDA GPU: pass --device cpu"):
            resolve_device(name)


@pytest.fixture
def four_gpus(monkeypatch):
    """Pretend four GPUs are visible: the rule is arithmetic on LOCAL_RANK and the index, no GPU is touched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cuda_is_this_process_gpu(four_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    four_gpus.setenv("WORLD_SIZE", "4")
    four_gpus.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 2)


def test_cuda_index_is_checked(four_gpus):
    with pytest.raises(UserError, match="GPU 4 does not exist"):
        resolve_device("cuda:4")


def test_cuda_n_is_refused_under_torchrun(four_gpus):
    four_gpus.setenv("WORLD_SIZE", "2")
    four_gpus.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="every process on one GPU"):
        resolve_device("cuda:1")


def test_single_process_runtime(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed("cpu") as rt:
        assert (rt.rank, rt.world_size, rt.main, rt.device) == (0, 1, True, torch.device("cpu"))
        rows = torch.arange(6.0).reshape(3, 2)
        assert gather_rows(rows) is rows
        assert gather_objects({"a": 1}) == [{"a": 1}]


def test_two_ranks_join_gather_and_leave(tmp_path):
    code, stderr = torchrun(Path(__file__).with_name("runtime_ranks.py"), str(tmp_path))
    assert code == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(ranks):
        assert (got["rank"], got["world_size"], got["device"]) == (r, 2, "cpu")
        assert got["joined"] and got["left"]
        assert got["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank 0's one row, then rank 1's two
        assert got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["stops"] == [True, False]  # any_rank: one rank's flag is every rank's
