"""The public Python API: load a trained run and embed your own images and sentences in its shared space.

Input: a run directory written by `clipcoco train` (its `latest` checkpoint) or one checkpoint file.
Output: a `CLIPModel` whose `encode_images` and `encode_texts` return L2-normalised float32 [N, E] tensors
on the CPU, so `images @ texts.T` are cosine similarities. This interface is kept stable.

    from clip import load
    model = load("runs/coco-karpathy", device="cpu")
    images = model.encode_images(["dog.jpg", "cat.jpg"])           # paths, PIL images or uint8 tensors
    texts = model.encode_texts(["a dog on a couch", "a cat on a bed"])
    probs = (model.logit_scale * images @ texts.T).softmax(dim=-1)  # [2, 2]

Image files are read as `clipcoco shards` packs them (a plain JPEG decoded as the loaders decode it; any other
file turned upright by its EXIF orientation and brought to 8 bits by `pipeline.images.upright_8bit`), then go
through exactly the eval transform of `clipcoco eval` (the run's `pipeline.transforms.ImageTransform`, from its
config: the center square resized to the run's image size, then normalised), so an eval image embeds as eval
embedded it.
Texts go through the frozen text encoder the run's text cache was made with (named with its weights' and
tokenizer's sha256 in the checkpoint's text fingerprint, which holds everything `embed-text` pooled with:
model, pooling, max_length), loaded on the first `encode_texts` only and kept, then the run's text head.
Used by `clipcoco search` (text queries) and `clipcoco zeroshot`.
"""

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from clip.checkpoint import Checkpoint, resolve_checkpoint
from clip.model import CLIP
from pipeline.embed_text import BATCH_SIZE, encode_queries, query_encoder
from pipeline.errors import UserError
from pipeline.images import kept_as_is, upright_8bit
from pipeline.runtime import resolve_device
from pipeline.transforms import ImageTransform

ImageLike = str | Path | Image.Image | torch.Tensor  # one item of what encode_images takes


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB of an image file, with the pixels `clipcoco eval` sees once `clipcoco shards` packed it.

    A JPEG the shards keep byte for byte (`kept_as_is`) is decoded by the loaders' decoder, so it gives the very
    pixels eval saw; any other file PIL reads (EXIF-rotated, 16-bit, PNG, TIFF, CMYK, ...) is made upright and
    8-bit by the shards' own conversion, only without their JPEG re-encoding at quality 95.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read image {path} ({err.strerror or err}): pass an existing image file") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if kept_as_is(image, data):
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return pil_to_tensor(image)
    except (OSError, ValueError, RuntimeError, SyntaxError) as err:  # PIL's or decode_jpeg's word on a bad file
        raise UserError(f"{path} is not an image that decodes ({err}): remove it or convert it to JPEG or "
                        "PNG") from None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] RGB of a PIL image made upright and 8-bit as the shards make it, in HWC memory like
    decode_jpeg's output."""
    return torch.from_numpy(np.array(upright_8bit(image).convert("RGB"))).permute(2, 0, 1)


def _as_tensors(item) -> Iterator[torch.Tensor]:
    """The uint8 [3, H, W] image(s) of one input item."""
    if isinstance(item, (str, Path)):
        yield read_image(item)
    elif isinstance(item, Image.Image):
        yield pil_to_tensor(item)
    elif isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.ndim not in (3, 4) or item.shape[-3] != 3:
            raise UserError(f"an image tensor must be uint8 [3, H, W] or [N, 3, H, W] RGB, got {item.dtype} "
                            f"{list(item.shape)}: convert it, e.g. (x * 255).round().to(torch.uint8)")
        yield from (item.unsqueeze(0) if item.ndim == 3 else item).cpu()
    else:
        raise UserError(f"cannot embed a {type(item).__name__} as an image: pass paths, PIL images or uint8 "
                        "tensors [3, H, W] / [N, 3, H, W]")


class CLIPModel:
    """A trained CLIP ready to embed images and texts. Make one with `clip.load`."""

    def __init__(self, module: CLIP, *, transform: ImageTransform, embed_dim: int, text_fingerprint: dict,
                 device: torch.device, batch_size: int | None, checkpoint: Path, step: int,
                 text_model_path: str | None = None) -> None:
        self.module = module  # in eval mode on `device`
        self.transform = transform  # the run's: its eval crop and normalisation turn an image into input
        self.embed_dim = embed_dim  # E, the width of every embedding
        self.text_fingerprint = text_fingerprint  # names the frozen text encoder and how it pooled
        self.text_model_path = text_model_path  # where it was found (None: the fingerprint's model names it)
        self.device = device
        self.batch_size = batch_size or BATCH_SIZE[device.type]  # images or texts per forward pass
        self.checkpoint = checkpoint
        self.step = step
        self._encoder = None  # the frozen text encoder, loaded by the first encode_texts

    @property
    def image_size(self) -> int:
        """The run's image size: the side of the square every image is resized to."""
        return self.transform.size

    @property
    def logit_scale(self) -> float:
        """The learned temperature's inverse: multiply cosine similarities by it before a softmax."""
        return float(self.module.logit_scale().detach())

    def _batch_size(self, batch_size: int | None) -> int:
        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise UserError(f"batch size {size}: pass at least 1")
        return size

    @torch.inference_mode()
    def encode_images(self, images: ImageLike | Iterable[ImageLike], *,
                      batch_size: int | None = None) -> torch.Tensor:
        """[N, E] float32 on the CPU, L2-normalised: one row per image, in order.

        `images`: one image or an iterable of them; an image is a path (str or Path), a PIL image or a uint8
        RGB tensor [3, H, W] (an [N, 3, H, W] tensor counts as N images). Decoded and transformed one batch
        at a time, so an iterable of many paths is never all in memory.
        """
        size = self._batch_size(batch_size)
        single = isinstance(images, (str, Path, Image.Image, torch.Tensor))
        pixels = (self.transform.eval_image(t) for item in ([images] if single else images)
                  for t in _as_tensors(item))
        feats, batch = [], []
        for image in pixels:
            batch.append(image)
            if len(batch) == size:
                feats.append(self._encode_batch(batch))
                batch = []
        if batch:
            feats.append(self._encode_batch(batch))
        if not feats:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(feats)

    def _encode_batch(self, batch: list[torch.Tensor]) -> torch.Tensor:
        images = self.transform.normalize(torch.stack(batch).to(self.device))
        return self.module.encode_image(images).float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: str | Iterable[str], *, batch_size: int | None = None) -> torch.Tensor:
        """[N, E] float32 on the CPU, L2-normalised: each text through the frozen encoder, then the text head.

        The frozen encoder is the one the run's text cache names (same pooling and max_length), loaded here
        the first time and kept; a UserError says so when it cannot be found or is not that model.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise UserError("encode_texts takes strings (one, or a list of them)")
        if not texts:
            return torch.zeros(0, self.embed_dim)
        if self._encoder is None:
            self._encoder = query_encoder(self.text_fingerprint, device=self.device, location=self.text_model_path)
        raw = encode_queries(texts, self.text_fingerprint, encoder=self._encoder,
                             batch_size=self._batch_size(batch_size))
        return self.module.encode_text(raw.to(self.device)).float().cpu()

    def __repr__(self) -> str:
        return (f"CLIPModel({self.checkpoint}, step {self.step}, image size {self.image_size}, "
                f"text encoder {self.text_fingerprint['model']}, device {self.device})")


def load(run_or_checkpoint: str | Path, *, device: str = "auto", batch_size: int | None = None) -> CLIPModel:
    """The CLIP of a run (its `latest` checkpoint) or of one checkpoint file, in eval mode on `device`.

    device: auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N. batch_size: images or
    texts per forward pass (None: 256 on a GPU, 64 on a CPU); encode_images/encode_texts can override it.
    """
    torch_device = resolve_device(device)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch size {batch_size}: pass at least 1 (or None for the device's default)")
    path = resolve_checkpoint(Path(run_or_checkpoint))
    ckpt = Checkpoint.load(path)
    # channels_last as in `clipcoco eval`, so the convolutions take the same kernels.
    module = ckpt.build_model().to(torch_device).to(memory_format=torch.channels_last)
    cfg = ckpt.cfg
    return CLIPModel(module, transform=cfg.data.transform(), embed_dim=cfg.model.embed_dim,
                     text_fingerprint=dict(ckpt.text_fingerprint), text_model_path=ckpt.text_model_path or None,
                     device=torch_device, batch_size=batch_size,
                     checkpoint=path, step=int(ckpt.step))
