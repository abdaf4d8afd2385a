"""CLIP model: shapes, unit-norm outputs, the clamped logit scale, and each way of initialising the trunk."""

import math

import pytest
import torch
import torchvision
from PIL import Image

from clip.config import ModelConfig
from clip.model import build_model
from pipeline.errors import UserError


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_shapes_and_unit_norm(head):
    model = build_model(ModelConfig(image_model="resnet18", image_weights="none", embed_dim=24, head=head), 40)
    img, txt, scale, bias = model(torch.randn(3, 3, 32, 32), torch.randn(5, 40, dtype=torch.float16))
    assert img.shape == (3, 24) and txt.shape == (5, 24)
    assert bias is None  # the bias exists only for the sigmoid loss
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(5))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_clamped_and_trains_in_log_space():
    model = build_model(ModelConfig(image_model="resnet18", image_weights="none", embed_dim=8), 4)
    assert model.log_logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert model.logit_scale().item() == pytest.approx(100.0)


def test_state_dict_path_initialises_the_trunk(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)  # a full classifier state dict: its fc is dropped
    model = build_model(ModelConfig(image_model="resnet18", image_weights=str(path), embed_dim=8), 4)
    torch.testing.assert_close(model.trunk.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.trunk.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_mismatched_or_missing_weights_are_refused(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="do not fit torchvision resnet18"):
        build_model(ModelConfig(image_model="resnet18", image_weights=str(path)), 4)
    with pytest.raises(UserError, match="not found"):
        build_model(ModelConfig(image_model="resnet18", image_weights=str(tmp_path / "nope.pt")), 4)


def test_weight_files_that_would_fail_later_are_refused_in_one_line(tmp_path):
    """A JPEG, a bare tensor, a tensor of another shape, a NaN in a BatchNorm buffer: each is one line when the model
    is built, before a run writes anything (a NaN buffer trained, and only its checkpoints were refused)."""
    source = torchvision.models.resnet18(weights=None).state_dict()
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({**source, "conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "shape.pt")
    nan = {k: v.clone() for k, v in source.items()}
    nan["layer2.0.bn1.running_var"][5] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    refusals = {"photo.jpg": r"photo.jpg are not a state dict torch.load reads \(UnpicklingError\)",
                "tensor.pt": r"tensor.pt hold a Tensor, not a state dict: pass a file saved with "
                             r"torch.save\(resnet18.state_dict\(\)\)",
                "shape.pt": r"do not fit torchvision resnet18: 0 missing keys .* 1 of another shape \(e.g. "
                            r"\['conv1.weight'\]\)",
                # Of the trunk's tensors: the classifier's fc.weight and fc.bias are not the trunk's.
                "nan.pt": rf"hold NaN/Inf values in 1 of {len(source) - 2} tensors \(first: layer2.0.bn1.running_var\)"}
    for name, message in refusals.items():
        with pytest.raises(UserError, match=message) as err:
            build_model(ModelConfig(image_model="resnet18", image_weights=str(tmp_path / name)), 4)
        assert len(str(err.value).splitlines()) == 1


def test_sigmoid_loss_adds_a_learned_bias():
    model = build_model(ModelConfig(image_model="resnet18", image_weights="none", embed_dim=8, loss="sigmoid"), 4)
    *_, bias = model(torch.randn(2, 3, 32, 32), torch.randn(2, 4))
    assert bias.requires_grad and bias.item() == pytest.approx(-10.0)


def test_locked_trunk_stays_frozen_in_eval_mode_and_takes_cached_features():
    model = build_model(ModelConfig(image_model="resnet18", image_weights="none", embed_dim=8, lock_image=True), 4)
    model.train()
    assert not model.trunk.training and model.image_head.training
    assert not any(p.requires_grad for p in model.trunk.parameters())
    images = torch.randn(2, 3, 32, 32)
    before = model.trunk.bn1.running_mean.clone()
    img, *_ = model(images, torch.randn(2, 4))
    img.sum().backward()
    torch.testing.assert_close(model.trunk.bn1.running_mean, before)  # no BatchNorm statistics update
    assert model.trunk.conv1.weight.grad is None and model.image_head.weight.grad is not None
    # Cached pooled features [B, 512] give exactly what the images give.
    torch.testing.assert_close(model.encode_image(model.image_features(images)), model.encode_image(images))
