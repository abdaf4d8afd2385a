"""Loaders: stream a shard directory as batches of ImageNet-normalised images and their COCO image ids.

Input: a `ShardSet` (`pipeline.shard_reader.open_shards`: WebDataset tars, members `jpg` + `id`, with DALI `.idx`
files). Output: `Batch`es (images [B, 3, S, S] float32 channels_last on the target device, image ids [B] int64
on the CPU). Not a command of its own: `clipcoco train` and `clipcoco eval` pick one with `--loader dali|torch`.

    loader = make_loader(open_shards(Path("shards/train")), kind="dali", batch_size=256, image_size=224,
                         train=True, device=torch.device("cuda"), seed=0, rank=0, world_size=1)
    for epoch in range(epochs):
        for batch in loader:          # one epoch; `loader.state_dict()` at any point resumes exactly there
            ...

kind="dali": `fn.readers.webdataset` over the `.idx`-indexed tars; JPEGs decoded on the GPU ("mixed") when the
device is CUDA, on the CPU otherwise. kind="torch": the baseline for machines without DALI; it reads each sample
at the byte offsets the same `.idx` files give, decodes with `torchvision.io.decode_jpeg` in `threads` DataLoader
workers and applies the same augmentation.

Train: random-resized-crop (area scale [crop_scale_min, 1], aspect ratio [3/4, 4/3]) to S x S, a seeded order
that differs per epoch, and `steps_per_epoch` full batches per rank, the same count on every rank (so DDP
ranks step together); the images no rank sees in an epoch are counted in `dropped_per_epoch`. Eval: the center
square of each image (side = its shorter side) resized to S x S, which is resize-shorter-then-center-crop without
rounding an intermediate size, so both loaders crop the same integer pixel box; file order, every image exactly
once across ranks, the last batch partial.
"""

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.errors import UserError
from pipeline.shard_reader import SampleIndex, ShardSet, decode_ids

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, also DALI's random_aspect_ratio default
CROP_ATTEMPTS = 10  # tries at a crop that fits before falling back to a center crop (both libraries use 10)
KINDS = ("dali", "torch")


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] float32, ImageNet-normalised, on the target device, channels_last
    image_ids: torch.Tensor  # [B] int64, on the CPU


def check_kind(kind: str) -> None:
    """The one check of a loader name (train, eval and bench take it from the user)."""
    if kind not in KINDS:
        raise UserError(f"--loader {kind!r}: use one of {', '.join(KINDS)}")


def make_loader(shards: ShardSet, *, kind: str, batch_size: int, image_size: int, train: bool,
                device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1, threads: int = 2,
                crop_scale_min: float = 0.9) -> "Loader":
    """The `kind` loader over `shards` for this rank; iterate it once per epoch."""
    check_kind(kind)
    if batch_size < 1 or image_size < 1 or threads < 1:
        raise UserError("batch_size, image_size and threads must all be >= 1")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    if not 0 < crop_scale_min <= 1:
        raise UserError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
    cls = DaliLoader if kind == "dali" else TorchLoader
    return cls(shards, batch_size=batch_size, image_size=image_size, train=train, device=torch.device(device),
               seed=seed, rank=rank, world_size=world_size, threads=threads, crop_scale_min=crop_scale_min)


class Loader:
    """Iterating yields the (remaining) Batches of the current epoch; iterate again for the next epoch."""

    kind = ""

    def __init__(self, shards: ShardSet, *, batch_size: int, image_size: int, train: bool, device: torch.device,
                 seed: int, rank: int, world_size: int, threads: int, crop_scale_min: float) -> None:
        self.shards, self.batch_size, self.image_size, self.train = shards, batch_size, image_size, train
        self.device, self.seed, self.rank, self.world_size = device, seed, rank, world_size
        self.threads, self.crop_scale_min = threads, crop_scale_min
        n = shards.n_images
        # Ranks get contiguous shares that differ by at most one image; DALI splits the same way.
        self.rank_images = n * (rank + 1) // world_size - n * rank // world_size
        # Train: the smallest rank's full batches, so every rank takes the same number of steps.
        self.steps_per_epoch = (n // world_size) // batch_size if train else math.ceil(self.rank_images / batch_size)
        # Images of the split no rank sees in a train epoch (the partial batches, over all ranks).
        self.dropped_per_epoch = n - world_size * self.steps_per_epoch * batch_size if train else 0
        if train and self.steps_per_epoch == 0:
            raise UserError(f"{shards.root} holds {n} images, fewer than one batch of {batch_size} per rank "
                            f"over {world_size} rank(s): lower --batch-size")
        self.epoch = 0  # epochs finished
        self.batch = 0  # batches yielded in the current epoch

    def _signature(self) -> dict:
        """What fixes the sequence of batches: a saved position only means something for the same values."""
        return {"kind": self.kind, "shards": self.shards.fingerprint, "n_images": self.shards.n_images,
                "batch_size": self.batch_size, "image_size": self.image_size, "train": self.train,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "crop_scale_min": self.crop_scale_min}

    def state_dict(self) -> dict:
        return {"signature": self._signature(), "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        mine = self._signature()
        diff = sorted(k for k in mine.keys() | state["signature"].keys() if state["signature"].get(k) != mine.get(k))
        if diff:
            raise UserError(f"the saved loader position is for a different loader ({', '.join(diff)} differ): "
                            "resume with the same shards, loader and data options, or start a new run")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class DaliLoader(Loader):
    """fn.readers.webdataset -> (fused crop) decode -> resize -> normalise, with DALI's own checkpointing."""

    kind = "dali"

    def __init__(self, shards: ShardSet, **options) -> None:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise UserError("--loader dali needs NVIDIA DALI: `pip install 'clipcoco[dali]'` "
                            "(nvidia-dali-cuda120 on CUDA 12), or use `--loader torch`") from e
        super().__init__(shards, **options)
        self._checkpoint: str | None = None  # a DALI checkpoint to restore when the pipeline is next built
        self._iterator = None

    def state_dict(self) -> dict:
        state = super().state_dict()
        # The iterator's checkpoint counts only the batches it has handed out, not those prefetched behind them.
        state["dali"] = self._iterator.checkpoints()[0] if self._iterator is not None else self._checkpoint
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._checkpoint, self._iterator = state["dali"], None

    def _build(self):
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cuda = self.device.type == "cuda"
        decoder = "mixed" if cuda else "cpu"
        gpu = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        size = self.image_size
        # The float32 constants `normalize` uses, so both loaders normalise with the same numbers.
        mean, std = ((torch.tensor(v) * 255).tolist() for v in (IMAGENET_MEAN, IMAGENET_STD))

        # The pipeline seed drives the crops: distinct per (seed, rank); the reader's seed drives the order.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=gpu,
                      seed=self.seed * self.world_size + self.rank, enable_checkpointing=True,
                      checkpoint=self._checkpoint)
        def pipeline():
            # Train ranks move to the next share each epoch (more variety per rank); eval ranks keep theirs.
            # pad_last_batch ends every reader epoch exactly at the shard's end (the padding is trimmed by the
            # PARTIAL policy below), so the shuffle buffer never carries images into the next epoch.
            jpegs, ids = fn.readers.webdataset(
                paths=[str(p) for p in self.shards.tars], index_paths=[str(p) for p in self.shards.indexes],
                ext=["jpg", "id"], dtypes=[types.UINT8, types.UINT8], missing_component_behavior="error",
                random_shuffle=self.train, seed=self.seed, shard_id=self.rank, num_shards=self.world_size,
                stick_to_shard=not self.train, pad_last_batch=True, name="Reader")
            if self.train:
                images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                       random_area=[self.crop_scale_min, 1.0],
                                                       random_aspect_ratio=list(ASPECT_RATIO),
                                                       num_attempts=CROP_ATTEMPTS)
            else:
                shape = fn.peek_image_shape(jpegs)  # [H, W, C] from the JPEG header, before decoding
                height, width = shape[0], shape[1]
                side = dmath.min(height, width)  # the box of center_square_box, computed per sample
                images = fn.decoders.image_slice(jpegs, fn.stack((height - side) // 2, (width - side) // 2),
                                                 fn.stack(side, side), axis_names="HW", device=decoder,
                                                 output_type=types.RGB)
            images = fn.resize(images, size=[size, size])
            # HWC output: permuted to NCHW below it is already channels_last in memory, no copy needed.
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                              mean=mean, std=std)
            return images, ids

        pipe = pipeline()
        pipe.build()
        return DALIGenericIterator([pipe], ["images", "image_ids"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True,
                                   prepare_first_batch=False)

    def __iter__(self) -> Iterator[Batch]:
        if self._iterator is None:
            self._iterator = self._build()
        for (out,) in self._iterator:  # ends at this rank's epoch end (auto_reset starts the next)
            full = out["images"].shape[0] == self.batch_size
            if self.train and (self.batch >= self.steps_per_epoch or not full):
                continue  # a larger rank's extra batch, or the partial one: read to end the reader's epoch
            self.batch += 1
            yield Batch(images=out["images"].permute(0, 3, 1, 2), image_ids=decode_ids(out["image_ids"].cpu()))
        self.epoch, self.batch = self.epoch + 1, 0


class TorchLoader(Loader):
    """Random access into the tars at the .idx offsets, decoded by torchvision in DataLoader workers.

    Reading by offset rather than streaming each tar gives a seeded global shuffle per (seed, epoch), disjoint
    per-sample rank shares even for a single-shard split, and an exact resume that skips batches unread.
    """

    kind = "torch"

    def __init__(self, shards: ShardSet, **options) -> None:
        super().__init__(shards, **options)
        index = SampleIndex.load(shards.indexes, tars=shards.tars)
        index.require("jpg", "id")
        if len(index) != shards.n_images:
            raise UserError(f"the .idx files of {shards.root} list {len(index)} samples but the "
                            f"manifest says {shards.n_images}: rebuild with `clipcoco shards --overwrite`")
        self._samples = _TarSamples(index, train=self.train, image_size=self.image_size,
                                    crop_scale_min=self.crop_scale_min, seed=self.seed)
        self._loader: torch.utils.data.DataLoader | None = None  # built on first use, kept across epochs

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Sample rows this rank reads in `epoch`, in order (a seeded permutation when training)."""
        n = self.shards.n_images
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)
        mine = order[n * self.rank // self.world_size: n * (self.rank + 1) // self.world_size]
        return mine[: self.steps_per_epoch * self.batch_size] if self.train else mine

    def _remaining_batches(self) -> list[list[tuple[int, int]]]:
        """The batch sampler's pass: (epoch, row) items of the batches still to come in the current epoch."""
        epoch, rows = self.epoch, self.epoch_rows(self.epoch)
        return [[(epoch, int(r)) for r in rows[k: k + self.batch_size]]
                for k in range(self.batch * self.batch_size, len(rows), self.batch_size)]

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:
            # Persistent workers: forking them costs more than a small epoch takes; the sampler re-reads the
            # position at every pass, so one DataLoader serves every epoch and every resume.
            self._loader = torch.utils.data.DataLoader(
                self._samples, batch_sampler=_Sampler(weakref.WeakMethod(self._remaining_batches)),
                num_workers=self.threads,
                persistent_workers=True, pin_memory=self.device.type == "cuda")
        for images, ids in self._loader:
            self.batch += 1
            yield Batch(images=normalize(images.to(self.device, non_blocking=True)), image_ids=ids)
        self.epoch, self.batch = self.epoch + 1, 0


class _Sampler:
    """A batch sampler whose batches are computed afresh each time a pass starts.

    It holds the loader weakly and hands out a plain list: a reference cycle (loader -> DataLoader -> sampler
    -> loader) would leave the workers to the garbage collector, which may close their queues first and then
    wait 5 s per worker for them to exit.
    """

    def __init__(self, batches: weakref.WeakMethod) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches()())


def random_resized_crop_box(height: int, width: int, *, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = ASPECT_RATIO) -> tuple[int, int, int, int]:
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


def center_square_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the centered square whose side is the shorter side (the eval crop)."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [3, size, size]: the (top, left, h, w) box of a uint8 [3, H, W] image, resized with antialiasing."""
    top, left, h, w = box
    # decode_jpeg returns HWC memory; keeping the crop HWC-contiguous keeps resize on its fast uint8 path
    # (a strided or CHW-contiguous crop is ~40x slower).
    crop = image[:, top: top + h, left: left + w].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return F.resize(crop, [size, size], antialias=True)


def eval_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """The eval transform of one uint8 [3, H, W] image: its center square resized to uint8 [3, size, size].

    The torch loader's eval path and `clip.api` (embedding a user's images) both call this; DALI computes the
    same box in its pipeline.
    """
    return crop_resize(image, center_square_box(*image.shape[1:]), size)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """float32 [B, 3, S, S] channels_last, ImageNet-normalised, of uint8 [B, 3, S, S] images (on their device)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return images.float().sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


class _TarSamples(torch.utils.data.Dataset):
    """dataset[(epoch, row)] -> (uint8 [3, S, S] image, image id); the crop is seeded by (seed, epoch, row)."""

    def __init__(self, index: SampleIndex, *, train: bool, image_size: int, crop_scale_min: float,
                 seed: int) -> None:
        self.index, self.train = index, train
        self.image_size, self.crop_scale_min, self.seed = image_size, crop_scale_min, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, row = item
        image_id = self.index.image_id(row)
        data = torch.frombuffer(bytearray(self.index.read(row, "jpg")), dtype=torch.uint8)
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
        if not self.train:
            return eval_image(image, self.image_size), image_id
        rng = np.random.default_rng([self.seed, epoch, row])
        box = random_resized_crop_box(*image.shape[1:], scale=(self.crop_scale_min, 1.0), rng=rng)
        return crop_resize(image, box, self.image_size), image_id
