"""GPU-only checks (`pytest -m gpu`; skipped cleanly without CUDA): DALI "mixed" decoding on coco-mini shards."""

import pytest
import torch
from conftest import take

from clip.config import DataConfig
from pipeline.loaders import make_loader

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def epoch(shards, kind, device, *, train=False, size=224):
    batches = list(make_loader(shards, kind=kind, batch_size=16, transform=DataConfig(image_size=size).transform(),
                               train=train, device=device, threads=2))
    return torch.cat([b.image_ids for b in batches]), torch.cat([b.images.cpu() for b in batches])


@pytest.mark.parametrize("size", [64, 224])
def test_dali_mixed_decoding_matches_cpu_decoding(mini, size):
    """nvJPEG / the hardware decoder vs libjpeg-turbo: the same crop box, pixels within JPEG tolerance."""
    gpu_ids, gpu = epoch(mini, "dali", CUDA, size=size)
    cpu_ids, cpu = epoch(mini, "dali", torch.device("cpu"), size=size)
    assert torch.equal(gpu_ids, cpu_ids)
    levels = (gpu - cpu).abs() * 0.226 * 255  # normalised units back to 8-bit levels (mean ImageNet std)
    assert levels.mean() < 1.5 and levels.mean(dim=(1, 2, 3)).max() < 3


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_batches_land_on_the_gpu_channels_last(mini, kind):
    batch = next(iter(make_loader(mini, kind=kind, batch_size=16, transform=DataConfig().transform(), train=True,
                                  device=CUDA, threads=2)))
    assert batch.images.device.type == "cuda" and batch.images.shape == (16, 3, 224, 224)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.image_ids.device.type == "cpu" and batch.image_ids.dtype == torch.int64


def test_torch_loader_on_cuda_matches_cpu(mini):
    gpu_ids, gpu = epoch(mini, "torch", CUDA, size=64)
    cpu_ids, cpu = epoch(mini, "torch", torch.device("cpu"), size=64)
    assert torch.equal(gpu_ids, cpu_ids)
    torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=0)


def test_dali_mixed_resume_is_exact(mini, tmp_path):
    """Stop mid-epoch, save, restore in a new loader: the same next batches, into the next epoch too."""
    def fresh():
        return make_loader(mini, kind="dali", batch_size=8, transform=DataConfig(image_size=64).transform(), train=True,
                           device=CUDA, seed=2, threads=2)

    straight = take(fresh(), 12)
    first = fresh()
    take(first, 4)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    rest = take(resumed, 8)
    assert [b.image_ids.tolist() for b in rest] == [b.image_ids.tolist() for b in straight[4:]]
    for a, b in zip(rest, straight[4:], strict=True):
        torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
