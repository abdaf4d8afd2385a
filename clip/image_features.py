"""`clipcoco embed-images`: every image of a shard directory through a frozen ResNet trunk once -> a Parquet cache of
its pooled features, so `clipcoco train --lock-image --image-features FILE` trains the heads on two caches alone,
without decoding an image.

Input: a shard directory, the trunk (`--image-model`, `--image-weights imagenet|PATH`) and the eval transform's
`--image-size` (the center square of each image, resized: the crop eval uses, so a locked run's eval sees the same
features). Output: one Parquet file, rows sorted by `image_id`: `image_id` int64, `embedding`
fixed_size_list<float16>[F] (F = 512 for resnet18/34, 2048 for resnet50/101, not normalised); schema metadata:
image_model, image_weights, trunk_sha256 (the trunk's weights, `clip.model.trunk_sha256`), image_size, transform,
shards_fingerprint, dim, clipcoco_version. Train checks each of them against its run, and that the rows are
the shards' images, each once, with finite features, before the first step.

    clipcoco embed-images data/shards/karpathy-trainval --image-weights imagenet --out feats-resnet50-224.parquet
    features = ImageFeatures.load(path); features.check(shards, cfg)
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from clip.config import Config, DataConfig, ModelConfig
from clip.embeddings import check_every_image_once, embed_images
from clip.model import build_model, trunk_sha256
from pipeline import __version__
from pipeline.errors import UserError
from pipeline.loaders import Batch, Loader
from pipeline.runtime import distributed, main_locked
from pipeline.shard_reader import ShardSet, open_shards
from pipeline.text_cache import non_finite_rows, read_cache, read_vectors, write_cache

TRANSFORM = "center square, resized to image_size, ImageNet-normalised"
METADATA_KEYS = ("image_model", "image_weights", "trunk_sha256", "image_size", "transform", "shards_fingerprint",
                 "dim", "clipcoco_version")


def feature_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    return pa.schema([("image_id", pa.int64()), ("embedding", pa.list_(pa.float16(), dim))], metadata=metadata)


def embed_shards(shards_dir: Path, *, out: Path, image_model: str = "resnet50", image_weights: str = "imagenet",
                 image_size: int = 224, device: str = "auto", loader: str = "auto", batch_size: int = 256,
                 threads: int = 4, progress: bool = True) -> dict:
    """Write the feature cache of `shards_dir` to `out`; returns a summary (rows, dim, path)."""
    if image_weights == "none":
        raise UserError("--image-weights none would cache the features of a random trunk, which a locked run cannot "
                        "learn from: pass imagenet or the path of a ResNet state dict")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: pass the Parquet file to write, e.g. {out}/features.parquet")
    # The folder's lock comes before any work and is held until the file is written.
    with main_locked(out.parent, "clipcoco embed-images"):
        return _embed_shards(open_shards(Path(shards_dir)), out=out, image_model=image_model,
                             image_weights=image_weights, image_size=image_size, device=device, loader=loader,
                             batch_size=batch_size, threads=threads, progress=progress)


def _embed_shards(shards: ShardSet, *, out: Path, image_model: str, image_weights: str, image_size: int,
                  device: str, loader: str, batch_size: int, threads: int, progress: bool) -> dict:
    model = build_model(ModelConfig(image_model=image_model, image_weights=image_weights, lock_image=True), 1)
    with distributed(device) as env:
        model = model.to(env.device, memory_format=torch.channels_last).eval()
        ids, feats = embed_images(model.image_features, model.feature_dim, shards=shards, device=env.device,
                                  loader=loader, batch_size=batch_size,
                                  transform=DataConfig(image_size=image_size).transform(), threads=threads,
                                  rank=env.rank, world=env.world_size, progress=progress, label="embedding images")
        check_every_image_once(ids, shards)
        if env.main:
            metadata = {"image_model": image_model, "image_weights": image_weights,
                        "trunk_sha256": trunk_sha256(model), "image_size": str(image_size), "transform": TRANSFORM,
                        "shards_fingerprint": shards.fingerprint, "dim": str(model.feature_dim),
                        "clipcoco_version": __version__}
            schema = feature_schema(model.feature_dim, metadata)
            values = pa.array(feats.numpy().astype(np.float16).reshape(-1), type=pa.float16())
            table = pa.table({"image_id": pa.array(ids, pa.int64()),
                              "embedding": pa.FixedSizeListArray.from_arrays(values, model.feature_dim)}
                             ).cast(schema)
            write_cache(out, [table], schema)
    return {"out": str(out), "rows": len(ids), "dim": model.feature_dim}


class ImageFeatures:
    """A feature cache in memory: sorted ids [I], float16 features [I, F] and the metadata."""

    def __init__(self, path: Path, metadata: dict[str, str], image_ids: np.ndarray, features: torch.Tensor) -> None:
        self.path, self.metadata, self.image_ids, self.features = path, metadata, image_ids, features
        self.dim = int(features.shape[1])
        self._ids = torch.from_numpy(image_ids)

    @classmethod
    def load(cls, path: Path) -> "ImageFeatures":
        path, rerun = Path(path), "clipcoco embed-images SHARDS_DIR --out FILE"
        table, metadata = read_cache(path, "image-feature cache", keys=METADATA_KEYS, columns=("image_id", "embedding"),
                                     hint=f"make it with `{rerun}`", rerun=rerun)
        ids = np.array(table.column("image_id").to_numpy(), dtype=np.int64)
        if not (np.diff(ids) > 0).all():
            raise UserError(f"{path}: rows are not sorted by image_id: rerun `{rerun}`")
        features = read_vectors(table, int(metadata["dim"]), path, rerun=rerun)
        bad = non_finite_rows(features.numpy())
        if len(bad):  # refused here, not as a NaN loss at step 1 with advice about the learning rate
            raise UserError(f"the image-feature cache {path} holds NaN/Inf values in {len(bad):,} of its {len(ids):,} "
                            f"feature vectors (first: image {ids[bad[0]]}): it is damaged, or the trunk's features "
                            f"overflow float16; make it again with `{rerun}`")
        return cls(path, metadata, ids, features)

    def check(self, shards: ShardSet, cfg: Config) -> None:
        """Stop unless these are the features of `shards` by the trunk and image size `cfg` trains with."""
        ours = {"shards_fingerprint": shards.fingerprint, "image_model": cfg.model.image_model,
                "image_size": str(cfg.data.image_size)}
        rerun = (f"rerun `clipcoco embed-images {shards.root} --image-model {cfg.model.image_model} --image-size "
                 f"{cfg.data.image_size} --out {self.path}` with the run's trunk weights")
        diff = {k: (self.metadata[k], v) for k, v in ours.items() if self.metadata[k] != v}
        if diff:
            said = ", ".join(f"{k}: cache {a!r} vs run {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"image-feature cache {self.path} does not fit this run ({said}): {rerun}")
        # The fingerprint names the shards, not the rows: a row taken out would give its image the next row's features.
        wanted = shards.image_ids()
        missing = np.setdiff1d(wanted, self.image_ids, assume_unique=True)
        extra = np.setdiff1d(self.image_ids, wanted, assume_unique=True)
        if len(missing) or len(extra):
            first = (missing if len(missing) else extra)[:5].tolist()
            raise UserError(f"image-feature cache {self.path} does not hold the images of {shards.root}: "
                            f"{len(missing):,} of its {len(wanted):,} images have no row and {len(extra):,} rows are "
                            f"of other images (first: {first}), so the file was edited or damaged: {rerun}")

    def check_trunk(self, sha256: str, weights: str) -> None:
        if self.metadata["trunk_sha256"] != sha256:
            made_by = self.metadata["image_weights"]
            raise UserError(f"image-feature cache {self.path} was made by another trunk ({made_by}, sha256 "
                            f"{self.metadata['trunk_sha256'][:12]}) than this run's ({weights}, sha256 "
                            f"{sha256[:12]}): pass the same --image-weights to embed-images and train")

    def lookup(self, image_ids: torch.Tensor) -> torch.Tensor:
        """[B, F] float16 features of `image_ids` (every id must be in the cache: `check` made sure)."""
        return self.features[torch.searchsorted(self._ids, image_ids.to(torch.int64))]


class FeatureLoader(Loader):
    """The train loader's order (the base class's seeded global permutation per epoch, cut per rank) over cached
    features instead of decoded images: a batch's `images` are its [B, F] pooled trunk features."""

    kind = "features"

    def __init__(self, shards: ShardSet, features: ImageFeatures, **options) -> None:
        super().__init__(shards, **options)
        self.features = features
        # Row -> image id once (one small read per sample): a batch is then one gather.
        self.row_ids = torch.tensor([self.index.image_id(row) for row in range(len(self.index))], dtype=torch.int64)

    def __iter__(self):
        for rows in self.remaining_batches():
            ids = self.row_ids[torch.from_numpy(rows)]
            self.batch += 1
            yield Batch(images=self.features.lookup(ids).to(self.device, torch.float32, non_blocking=True),
                        image_ids=ids)
        self.epoch, self.batch = self.epoch + 1, 0
