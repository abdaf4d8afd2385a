"""The image transform: how a decoded image becomes the image tower's input, in training and in eval.

One frozen `ImageTransform` describes it (size, the train crop's area and aspect ranges, the eval crop, the resize's
interpolation, the normalisation's mean and std); `clip.config.DataConfig.transform()` builds it from a run's config.
Everything that turns pixels into model input takes it: both loaders (`pipeline.loaders`: the torch loader calls its
methods, the DALI pipeline reads its fields), the model API (`clip.api`: a user's image files), and the benchmarks
(`clip.apps.bench`). Not a stage of its own: nothing is read or written.

    transform = ImageTransform(size=224, crop_scale_min=0.9)
    image = transform.eval_image(decode_jpeg(data))      # uint8 [3, 224, 224]: the center square, resized
    batch = transform.normalize(torch.stack([image]))    # float32 [1, 3, 224, 224] channels_last

Train: random-resized-crop (area a fraction in [crop_scale_min, 1] of the image's, aspect ratio log-uniform in
`aspect_ratio`), the box drawn from a generator the caller seeds. Eval: the center square of each image (side = its
shorter side), which is resize-shorter-then-center-crop without rounding an intermediate size. Both boxes are resized
to S x S with antialiasing, then normalised per channel.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, also DALI's random_aspect_ratio default
CROP_ATTEMPTS = 10  # tries at a crop that fits before falling back to a center crop (both libraries use 10)
# An interpolation both loaders compute alike: torchvision's mode and DALI's `types.DALIInterpType` member name.
INTERPOLATIONS = {"bilinear": (InterpolationMode.BILINEAR, "INTERP_LINEAR")}

Box = tuple[int, int, int, int]  # (top, left, h, w) in pixels


@dataclass(frozen=True)
class ImageTransform:
    """How an image becomes model input; the loaders, the API and the benchmarks all take this one description."""

    size: int  # S: every image comes out S x S
    crop_scale_min: float  # train: the crop's area is a fraction in [crop_scale_min, 1] of the image's
    aspect_ratio: tuple[float, float] = ASPECT_RATIO  # train: the crop's width / height, drawn log-uniform
    interpolation: str = "bilinear"  # of the resize (antialiased): a key of INTERPOLATIONS
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per RGB channel, of pixel values scaled to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise UserError(f"size must be >= 1, got {self.size}")
        if not 0 < self.crop_scale_min <= 1:
            raise UserError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if not 0 < self.aspect_ratio[0] <= self.aspect_ratio[1]:
            raise UserError(f"aspect_ratio must be (low, high) with 0 < low <= high, got {self.aspect_ratio}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"mean and std must be 3 values (RGB), std > 0: got {self.mean}, {self.std}")

    @property
    def dali_interpolation(self) -> str:
        """The resize's interpolation as DALI names it (a member of `nvidia.dali.types.DALIInterpType`)."""
        return INTERPOLATIONS[self.interpolation][1]

    @property
    def crop_scale(self) -> tuple[float, float]:
        """The train crop's area range, as torchvision's `scale` and DALI's `random_area` take it."""
        return (self.crop_scale_min, 1.0)

    def train_box(self, height: int, width: int, rng: np.random.Generator) -> Box:
        """The random-resized crop of a height x width image, drawn from `rng`."""
        return random_resized_crop_box(height, width, scale=self.crop_scale, rng=rng, ratio=self.aspect_ratio)

    def resize(self, image: torch.Tensor, box: Box) -> torch.Tensor:
        """uint8 [3, S, S]: the `box` of a uint8 [3, H, W] image, resized with antialiasing."""
        top, left, h, w = box
        # decode_jpeg returns HWC memory; keeping the crop HWC-contiguous keeps resize on its fast uint8 path
        # (a strided or CHW-contiguous crop is ~40x slower).
        crop = image[:, top: top + h, left: left + w].permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return F.resize(crop, [self.size, self.size], interpolation=INTERPOLATIONS[self.interpolation][0],
                        antialias=True)

    def eval_image(self, image: torch.Tensor) -> torch.Tensor:
        """The eval transform of one uint8 [3, H, W] image up to normalisation: uint8 [3, S, S] of its center square.

        The torch loader's eval path and `clip.api` (embedding a user's images) both call this; DALI computes the
        same box in its pipeline.
        """
        return self.resize(image, center_square_box(*image.shape[1:]))

    def scaled_mean_std(self) -> tuple[list[float], list[float]]:
        """mean and std in pixel levels (x 255) as the float32 numbers `normalize` uses, for DALI's normalisation."""
        return tuple((torch.tensor(v) * 255).tolist() for v in (self.mean, self.std))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """float32 [B, 3, S, S] channels_last, normalised, of uint8 [B, 3, S, S] images (on their device)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1) * 255
        return images.float().sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def random_resized_crop_box(height: int, width: int, *, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = ASPECT_RATIO) -> Box:
    """(top, left, h, w) of a random crop: area fraction in `scale`, aspect ratio log-uniform in `ratio`.

    torchvision's RandomResizedCrop.get_params, drawing from `rng` so a sample's crop depends only on its seed.
    """
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_square_box(height: int, width: int) -> Box:
    """(top, left, h, w) of the centered square whose side is the shorter side (the eval crop)."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side
