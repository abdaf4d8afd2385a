"""The CLIP model: a torchvision ResNet image tower and two projection heads into one shared space.

Inputs: images [B, 3, S, S] (ImageNet-normalised) and cached text vectors [N, text_dim] from the text
cache; the text model itself is never loaded here, its output was computed once by `clipcoco embed-text`.
Output: L2-normalised embeddings [B, E] and [N, E], and the learned logit scale.
Used by `clipcoco train`, `clipcoco eval` and `clipcoco search` (through `clip.checkpoint`).
"""

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from clip.config import ModelConfig
from pipeline.errors import UserError


def _head(in_dim: int, out_dim: int, kind: str, tower: str, form: str) -> nn.Module:
    """A projection head in open_clip's own forms (its timm image head, its Hugging Face text head), so a run
    exports as an open_clip model as it is: the image head has biases, the text head none; an MLP's hidden width
    is 2 x out_dim for images (timm's Mlp) and (in_dim + out_dim) // 2 for text (HFTextEncoder). `v1` rebuilds
    the older heads (biases everywhere, hidden width in_dim) so their checkpoints still load."""
    bias = form == "v1" or tower == "image"
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    hidden = in_dim if form == "v1" else 2 * out_dim if tower == "image" else (in_dim + out_dim) // 2
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out_dim, bias=bias))


def head_form(state_dict: dict) -> str:
    """Which heads a CLIP state dict holds: only v1 gave the text head biases."""
    return "v1" if {"text_head.bias", "text_head.0.bias"} & state_dict.keys() else "open_clip"


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig, text_dim: int, *, heads: str = "open_clip") -> None:
        super().__init__()
        trunk = getattr(torchvision.models, cfg.image_model)(weights=None)
        feat_dim = trunk.fc.in_features  # 512 (resnet18/34) or 2048 (resnet50/101)
        trunk.fc = nn.Identity()  # the trunk ends at global average pooling: [B, feat_dim]
        self.trunk = trunk
        self.image_head = _head(feat_dim, cfg.embed_dim, cfg.head, "image", heads)
        self.text_head = _head(text_dim, cfg.embed_dim, cfg.head, "text", heads)
        # Learned in log space so the scale stays positive; CLIP's init is 1/0.07.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        # SigLIP's learnable bias (init -10: the many negatives start near probability 0), only for its loss.
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias)) if cfg.loss == "sigmoid" else None
        self.max_logit_scale = cfg.max_logit_scale
        self.text_dim = text_dim
        self.feature_dim = feat_dim
        self.embed_dim = cfg.embed_dim
        self.lock_image = cfg.lock_image
        if cfg.lock_image:  # the pretrained trunk stays as it is: no gradients, BatchNorm statistics frozen
            self.trunk.requires_grad_(False)
            self.trunk.eval()

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        if self.lock_image:
            self.trunk.eval()
        return self

    def image_features(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] images -> the trunk's pooled features [B, feature_dim] (what `clipcoco embed-images` caches)."""
        if self.lock_image:
            with torch.no_grad():
                return self.trunk(images)
        return self.trunk(images)

    def encode_image(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] images, or their cached pooled trunk features [B, feature_dim] (a locked trunk) -> [B, E]."""
        features = images if images.ndim == 2 else self.image_features(images)
        return F.normalize(self.image_head(features.to(next(self.image_head.parameters()).dtype)), dim=-1)

    def encode_text(self, text: Tensor) -> Tensor:
        # The cache stores float16; the head's dtype (or autocast) decides the compute precision.
        dtype = next(self.text_head.parameters()).dtype
        return F.normalize(self.text_head(text.to(dtype)), dim=-1)  # [N, D] -> [N, E]

    def logit_scale(self) -> Tensor:
        # Clamped as in CLIP: an unbounded scale makes the softmax one-hot and training unstable.
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        # One forward for both towers, so DistributedDataParallel sees every parameter used in its forward.
        return self.encode_image(images), self.encode_text(text), self.logit_scale(), self.logit_bias


def trunk_sha256(model: CLIP) -> str:
    """sha256 of the trunk's weights and buffers (names, dtypes, values): which trunk made a feature cache."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.trunk.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fit_problems(expected: dict[str, torch.Size], state: dict) -> tuple[list[str], list[str], list[str]]:
    """The names of `state` that do not fit the `expected` shapes: (missing, unexpected, of another shape), sorted.
    One rule for a checkpoint's weights and for `--image-weights`."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = sorted(k for k in expected.keys() & state.keys()
                       if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k])
    return missing, unexpected, misshapen


def non_finite(state: dict[str, Tensor]) -> dict[str, int]:
    """{name: count of NaN/Inf values} of the floating-point tensors of `state` that hold any, in `state`'s order."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    return {k: n for k, n in counts.items() if n}


def _load_trunk_weights(model: CLIP, cfg: ModelConfig) -> None:
    if cfg.image_weights == "none":
        return
    if cfg.image_weights == "imagenet":
        weights = torchvision.models.get_model_weights(cfg.image_model).DEFAULT
        try:
            state = weights.get_state_dict(progress=False)  # downloaded by torchvision once, then cached
        except OSError as err:  # URLError without a network, or a cache that cannot be written
            raise UserError(f"cannot get torchvision's ImageNet weights for {cfg.image_model} ({type(err).__name__}: "
                            f"{getattr(err, 'reason', err)}): pass --image-weights none (from scratch) or "
                            f"--image-weights PATH (a state dict), or put {weights.url.rsplit('/', 1)[-1]} in "
                            "$TORCH_HOME/hub/checkpoints (default ~/.cache/torch) when offline") from None
    else:
        path = Path(cfg.image_weights)
        if not path.is_file():
            raise UserError(f"image weights {path} not found: pass imagenet, none or a state-dict file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # not torch.load's own message: it advises weights_only=False, which runs pickles
            raise UserError(f"image weights {path} are not a state dict torch.load reads ({type(err).__name__}): pass "
                            f"imagenet, none or a file saved with torch.save({cfg.image_model}.state_dict())") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"image weights {path} hold a {type(state).__name__}, not a state dict: pass a file saved "
                            f"with torch.save({cfg.image_model}.state_dict())")
    # A classifier's fc layer does not belong to the trunk; everything else must match exactly.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected, misshapen = fit_problems({k: v.shape for k, v in model.trunk.state_dict().items()}, state)
    if missing or unexpected or misshapen:
        raise UserError(
            f"image weights {cfg.image_weights} do not fit torchvision {cfg.image_model}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(misshapen)} of another shape (e.g. {misshapen[:2]}); pass a state dict saved from the same "
            "torchvision model"
        )
    # Here, before any step: a NaN in a BatchNorm buffer would train, and only its checkpoints would be refused.
    bad = non_finite(state)
    if bad:
        raise UserError(f"image weights {cfg.image_weights} hold NaN/Inf values in {len(bad)} of {len(state)} tensors "
                        f"(first: {next(iter(bad))}): the file is damaged or was saved from a diverged model; pass "
                        "another")
    model.trunk.load_state_dict(state)


def build_model(cfg: ModelConfig, text_dim: int) -> CLIP:
    """A fresh CLIP whose trunk starts from `cfg.image_weights` (imagenet | none | a state-dict path)."""
    model = CLIP(cfg, text_dim)
    _load_trunk_weights(model, cfg)
    return model
