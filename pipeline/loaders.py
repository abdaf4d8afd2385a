"""Loaders: stream a shard directory as batches of normalised images and their COCO image ids.

Input: a `ShardSet` (`pipeline.shard_reader.open_shards`: WebDataset tars with DALI `.idx` files) and the
`ImageTransform` to apply (`pipeline.transforms`; a run's is `DataConfig.transform()`). Output: `Batch`es (images
[B, 3, S, S] float32 channels_last on the target device, image ids [B] int64 on the CPU). Not a command of its own:
`clipcoco train`, `eval` and `bench` pick one with `--loader auto|dali|torch` (auto: dali on CUDA, torch on a CPU).

    loader = make_loader(open_shards(Path("shards/train")), kind="dali", batch_size=256, threads=4, train=True,
                         transform=ImageTransform(size=224, crop_scale_min=0.9), device=torch.device("cuda"),
                         seed=0, rank=0, world_size=1)
    with loader:                      # the torch loader's workers end with the block, however it ends
        for epoch in range(epochs):
            for batch in loader:      # one epoch; `loader.state_dict()` at any point resumes exactly there
                ...

Both loaders read each sample at the byte offsets the `.idx` files give (`SampleIndex`), in one order and with one
crop per sample that the base class fixes: a seeded global permutation of the whole split per (seed, epoch), cut
into one share per rank, and a crop box that is a function of (seed, epoch, row). So the same seed gives the same
image ids in every batch and the same crops in both, and a resume is just the (epoch, batch) position.
kind="dali": the JPEG bytes and boxes go to DALI through an external source; it decodes only the box
(`fn.decoders.image_slice`, "mixed" = nvJPEG on CUDA, the CPU otherwise), resizes and normalises.
kind="torch": the baseline for machines without DALI: `torchvision.io.decode_jpeg` in `threads` DataLoader workers.

Train: the transform's random-resized crop to S x S and `steps_per_epoch` full batches per rank, the same count on
every rank (so DDP ranks step together); the images no rank sees in an epoch are counted in `dropped_per_epoch`.
Eval: the transform's center square resized to S x S; file order, every image exactly once across ranks, the last
batch partial.

Damage: the first pass also hashes the shards of this rank's share against their manifest (`ShardCheck`, on a thread
of its own) and stops at the first batch after a mismatch, or at the end of the pass, with one line naming the
shard; the .idx files are checked against the tar layout before anything is read (`SampleIndex.check_layout`).
"""

import atexit
import contextlib
import functools
import json
import math
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.errors import UserError, require_extra
from pipeline.shard_reader import SampleIndex, ShardCheck, ShardSet
from pipeline.transforms import Box, ImageTransform, center_square_box

KINDS = ("auto", "dali", "torch")


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] float32, ImageNet-normalised, on the target device, channels_last
    image_ids: torch.Tensor  # [B] int64, on the CPU


def check_kind(kind: str) -> None:
    """The one check of a loader name (train, eval and bench take it from the user)."""
    if kind not in KINDS:
        raise UserError(f"--loader {kind!r}: use one of {', '.join(KINDS)}")


def resolve_kind(kind: str, device: torch.device) -> str:
    """auto -> DALI on CUDA (it decodes on the GPU), the torch loader on a CPU (DALI's CPU resize is slower there:
    docs/benchmarks.md); dali and torch as asked."""
    check_kind(kind)
    if kind == "auto":
        return "dali" if torch.device(device).type == "cuda" else "torch"
    return kind


def make_loader(shards: ShardSet, *, kind: str, batch_size: int, transform: ImageTransform, train: bool,
                device: torch.device, threads: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> "Loader":
    """The `kind` loader over `shards` for this rank, applying `transform` (its train or eval crop, as `train`
    says) with `threads` decoding threads; iterate it once per epoch."""
    kind = resolve_kind(kind, device)
    if batch_size < 1 or threads < 1:
        raise UserError("batch_size and threads must both be >= 1")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    cls = DaliLoader if kind == "dali" else TorchLoader
    return cls(shards, batch_size=batch_size, transform=transform, train=train, device=torch.device(device),
               seed=seed, rank=rank, world_size=world_size, threads=threads)


@dataclass(frozen=True)
class Crops:
    """Each sample's crop box: a function of (seed, epoch, row) alone, so both loaders crop alike and a resumed run
    crops as an uninterrupted one."""

    transform: ImageTransform
    train: bool
    seed: int

    def box(self, epoch: int, row: int, height: int, width: int) -> Box:
        """(top, left, h, w): the transform's random-resized crop when training, the center square for eval."""
        if not self.train:
            return center_square_box(height, width)
        return self.transform.train_box(height, width, np.random.default_rng([self.seed, epoch, row]))


class Loader:
    """Iterating yields the (remaining) Batches of the current epoch; iterate again for the next epoch."""

    kind = ""

    def __init__(self, shards: ShardSet, *, batch_size: int, transform: ImageTransform, train: bool,
                 device: torch.device, seed: int, rank: int, world_size: int, threads: int) -> None:
        self.shards, self.batch_size, self.transform, self.train = shards, batch_size, transform, train
        self.device, self.seed, self.rank, self.world_size, self.threads = device, seed, rank, world_size, threads
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
        self.index = SampleIndex.load(shards.indexes, tars=shards.tars)
        self.index.require("jpg", "json", "id")
        self.index.check_layout()
        # What either loader reads is what the .idx files list: they must list what the manifest counts, or an
        # epoch would quietly be short (an index written by a second `clipcoco shards` into the same folder, say).
        listed = np.bincount(self.index.tar_of, minlength=len(shards.tars)).tolist()
        counted = [e["count"] for e in shards.manifest["shards"]]
        if len(self.index) != n or listed != counted:
            wrong = [f"{t.name}: {a} in its .idx, {b} in the manifest"
                     for t, a, b in zip(shards.tars, listed, counted, strict=True) if a != b]
            raise UserError(f"the .idx files of {shards.root} list {len(self.index)} samples but its manifest counts "
                            f"{n}" + (f" ({'; '.join(wrong[:3])})" if wrong else "") + ": check the folder with "
                            f"`clipcoco shards --verify "
                            f"{shards.root}` and rebuild it with `clipcoco shards ... --overwrite`")
        self.crops = Crops(transform, train=train, seed=seed)
        self.epoch = 0  # epochs finished
        self.batch = 0  # batches yielded in the current epoch
        self._check: ShardCheck | None = None  # the shards' sha256, started by the first pass

    def shards_to_check(self) -> list[int]:
        """The shards holding this rank's eval share (file order): what it reads in eval, and together with the other
        ranks' every shard once, so a train run hashes each shard on one rank, not on all."""
        n, counts = self.shards.n_images, [e["count"] for e in self.shards.manifest["shards"]]
        first, end = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        starts = np.cumsum([0, *counts])
        return [s for s in range(len(counts)) if starts[s] < end and starts[s + 1] > first]

    def finish_check(self) -> None:
        """Wait for the shard check of the first pass (UserError naming a damaged shard): for a caller that stops
        mid-pass (a run whose target falls inside an epoch), which the end-of-pass wait never reaches."""
        if self._check is not None:
            self._check.wait()

    def _checked(self, items: Iterator) -> Iterator:
        """`items` of one pass, stopped by damage the shard check finds: at each item, at the end of the pass (which
        waits for the check), and in place of an error that damaged bytes cause (a JPEG that does not decode)."""
        if self._check is None:  # after the torch loader's workers fork (its __iter__): none forks mid-read
            self._check = ShardCheck(self.shards, self.shards_to_check())
        try:
            for item in items:
                self._check.raise_if_damaged()
                yield item
        except UserError:  # already says what to do
            raise
        except Exception:  # not `as err`: a frame that holds its own exception is a reference cycle
            self._check.wait()  # a damaged shard explains the error better than its traceback does
            raise
        self._check.wait()

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Sample rows this rank reads in `epoch`, in order: one seeded permutation of the whole split per
        (seed, epoch) when training, cut into one share per rank; file order for eval."""
        n = self.shards.n_images
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.train else np.arange(n)
        mine = order[n * self.rank // self.world_size: n * (self.rank + 1) // self.world_size]
        return mine[: self.steps_per_epoch * self.batch_size] if self.train else mine

    def remaining_batches(self) -> list[np.ndarray]:
        """The rows of each batch still to come in the current epoch."""
        rows = self.epoch_rows(self.epoch)
        return [rows[k: k + self.batch_size] for k in range(self.batch * self.batch_size, len(rows), self.batch_size)]

    def _signature(self) -> dict:
        """What fixes the sequence of batches: a saved position only means something for the same values (the
        transform's size and crop scale, the two a run's config sets, under the keys positions were saved with)."""
        return {"kind": self.kind, "shards": self.shards.fingerprint, "n_images": self.shards.n_images,
                "batch_size": self.batch_size, "image_size": self.transform.size, "train": self.train,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "crop_scale_min": self.transform.crop_scale_min}

    def state_dict(self) -> dict:
        return {"signature": self._signature(), "epoch": self.epoch, "batch": self.batch}

    def close(self) -> None:
        """Let go of what the loader holds beyond its position (the torch loader's worker processes); it can be
        iterated again afterwards. `with loader:` calls it however the block ends."""

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load_state_dict(self, state: dict) -> None:
        if "dali" in state:
            raise UserError("this loader position was saved by the DALI reader of clipcoco before 0.2 (a shuffle "
                            "buffer over the tars, not a global shuffle), which this loader cannot restore: start "
                            "the run again with --overwrite (or another --out)")
        mine = self._signature()
        diff = sorted(k for k in mine.keys() | state["signature"].keys() if state["signature"].get(k) != mine.get(k))
        if diff:
            raise UserError(f"the saved loader position is for a different loader ({', '.join(diff)} differ): "
                            "resume with the same shards, loader and data options, or start a new run")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class DaliLoader(Loader):
    """The loader's order and crop boxes -> DALI: the JPEG bytes through an external source, decoded with the box
    fused into decoding ("mixed" on CUDA: nvJPEG), resized and normalised on the device."""

    kind = "dali"

    def __init__(self, shards: ShardSet, **options) -> None:
        require_extra("nvidia.dali", "dali", "--loader dali",
                      otherwise=" (on a CUDA 12 driver: nvidia-dali-cuda120), or use `--loader torch`")
        super().__init__(shards, **options)

    def _build(self, source: "_DaliSource"):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cuda = self.device.type == "cuda"
        gpu = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        size, mean, std = self.transform.size, *self.transform.scaled_mean_std()
        interp = getattr(types, self.transform.dali_interpolation)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=gpu, seed=self.seed)
        def pipeline():
            jpegs, anchors, shapes = fn.external_source(source=source, num_outputs=3, batch=True,
                                                        dtype=[types.UINT8, types.INT32, types.INT32])
            # Integer anchor and shape are absolute pixels: the crop box is decoded, nothing else.
            images = fn.decoders.image_slice(jpegs, anchors, shapes, axis_names="HW",
                                             device="mixed" if cuda else "cpu", output_type=types.RGB)
            images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
            # HWC output: permuted to NCHW below it is already channels_last in memory, no copy needed.
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mean=mean, std=std)

        pipe = pipeline()
        pipe.build()
        return DALIGenericIterator([pipe], ["images"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                   prepare_first_batch=False)

    def __iter__(self) -> Iterator[Batch]:
        batches = self.remaining_batches()
        if batches:  # one pipeline per pass: its source ends with the epoch
            source = _DaliSource(self, batches, epoch=self.epoch)
            for rows, (out,) in self._checked(zip(batches, self._build(source), strict=True)):
                self.batch += 1
                yield Batch(images=out["images"].permute(0, 3, 1, 2), image_ids=source.image_ids(rows))
        self.epoch, self.batch = self.epoch + 1, 0


class _DaliSource:
    """DALI's external source for one pass: per batch, the JPEG bytes and the (top, left), (h, w) crop boxes."""

    def __init__(self, loader: Loader, batches: list[np.ndarray], *, epoch: int) -> None:
        self.loader, self.batches, self.epoch, self.next = loader, batches, epoch, 0
        self.ids: dict[int, int] = {}

    def __iter__(self) -> "_DaliSource":
        return self

    def __next__(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        if self.next == len(self.batches):
            raise StopIteration
        rows, self.next = self.batches[self.next], self.next + 1
        index = self.loader.index
        jpegs, anchors, shapes = [], [], []
        for row in rows.tolist():
            meta = json.loads(index.read(row, "json"))  # the size as DALI decodes it (EXIF orientation applied)
            top, left, h, w = self.loader.crops.box(self.epoch, row, meta["height"], meta["width"])
            self.ids[row] = index.image_id(row)
            jpegs.append(np.frombuffer(index.read(row, "jpg"), dtype=np.uint8))
            anchors.append(np.array([top, left], dtype=np.int32))
            shapes.append(np.array([h, w], dtype=np.int32))
        return jpegs, anchors, shapes

    def image_ids(self, rows: np.ndarray) -> torch.Tensor:
        """[B] int64 ids of a batch DALI handed out (the source has read it: DALI runs ahead of the consumer)."""
        return torch.tensor([self.ids.pop(row) for row in rows.tolist()], dtype=torch.int64)


class TorchLoader(Loader):
    """Random access into the tars at the .idx offsets, decoded by torchvision in DataLoader workers.

    Reading by offset rather than streaming each tar gives a seeded global shuffle per (seed, epoch), disjoint
    per-sample rank shares even for a single-shard split, and an exact resume that skips batches unread.
    """

    kind = "torch"

    def __init__(self, shards: ShardSet, **options) -> None:
        super().__init__(shards, **options)
        self._samples = _TarSamples(self.index, crops=self.crops)
        self._workers: _Workers | None = None  # started by the first pass, kept for the next ones until `close`

    def __iter__(self) -> Iterator[Batch]:
        batches = self.remaining_batches()
        if batches:
            self._start_pass(batches)  # before the shard check's thread starts (`_checked`): no fork mid-read
            first = self.batch
            try:
                # The ids are read here, not in the workers, so a damaged id member stops the run with the shard's
                # name in one line (an error raised in a worker comes back wrapped in its traceback).
                for images in self._checked(self._images(len(batches), first)):
                    rows = batches[self.batch - first]
                    self.batch += 1
                    ids = torch.tensor([self.index.image_id(row) for row in rows.tolist()], dtype=torch.int64)
                    yield Batch(images=self.transform.normalize(images.to(self.device, non_blocking=True)),
                                image_ids=ids)
            except Exception:
                self.close()  # a failed pass ends its workers now rather than whenever the loader goes
                raise
        self.epoch, self.batch = self.epoch + 1, 0

    def _start_pass(self, batches: list[np.ndarray]) -> None:
        """Have the workers (started now if none run) serve `batches` of the current epoch next."""
        if self._workers is None:
            self._workers = _Workers(self._samples, threads=self.threads, seed=self.seed,
                                     pin_memory=self.device.type == "cuda")
        self._workers.start_pass([[(self.epoch, int(r)) for r in rows] for rows in batches])

    def _images(self, count: int, first: int) -> Iterator[torch.Tensor]:
        """The uint8 [B, 3, S, S] batches of a pass of `count` batches that started at batch `first`, from the
        workers (new ones, at the loader's position, for a pass resumed after `close`)."""
        while self.batch - first < count:
            if self._workers is None:
                self._start_pass(self.remaining_batches())
            yield next(self._workers.batches)

    def close(self) -> None:
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.close()


class _Workers:
    """The torch loader's worker processes: one DataLoader with persistent workers, serving pass after pass.

    They end however the loader ends, and never rely on what else still refers to torch's iterator (an error's
    traceback does): each worker waits on a semaphore in a thread of its own and exits when it is released, once per
    worker. `close` releases it (after letting torch shut the workers down, which it does at once when nothing else
    holds its iterator), so does the loader going without `close`, and so does an exit hook while they run:
    multiprocessing's own exit handler would end them with the SIGTERM they ignore and wait for them forever. The
    hook is registered when the workers start, after that handler (registered when multiprocessing's semaphore
    module is imported, which creating the semaphore needs), and atexit runs the last registered first.
    """

    def __init__(self, samples: "_TarSamples", *, threads: int, seed: int, pin_memory: bool) -> None:
        self.passes = _Passes()
        # A semaphore, not an Event, whose `set` waits for every waiter to wake (forever for workers already gone).
        exiting = multiprocessing.Semaphore(0)
        self.exit_hook = functools.partial(_release, exiting, times=threads)
        # Run when this object goes (`close`, or the loader dropped): not at exit (`exit_hook` is registered for it).
        self.end = weakref.finalize(self, _end_workers, self.exit_hook)
        self.end.atexit = False
        self.loader = torch.utils.data.DataLoader(
            samples, batch_sampler=self.passes, num_workers=threads, persistent_workers=True, pin_memory=pin_memory,
            worker_init_fn=functools.partial(_init_worker, exiting=exiting),
            # Its workers' base seed from a generator of its own, not a draw from the global RNG, which a
            # checkpoint saves: a resumed run would hold the global RNG one draw past an uninterrupted one.
            generator=torch.Generator().manual_seed(seed))
        self.batches: Iterator[torch.Tensor] | None = None

    def start_pass(self, items: list[list[tuple[int, int]]]) -> None:
        """Serve the (epoch, row) items of each batch of `items` next (dropping what a pass left half-read)."""
        self.passes.items = items
        if self.batches is None:
            # The workers start (fork) here, with the stop signals blocked: a stop sent while they start stays pending
            # in them until they ignore it (`_init_worker`), and in this process until the block ends.
            with _stop_signals_blocked():
                self.batches = iter(self.loader)
            atexit.register(self.exit_hook)
        else:
            self.batches = iter(self.loader)

    def close(self) -> None:
        """End the workers now: torch shuts them down as its iterator goes (joined), and any it cannot (its iterator
        still referred to) exit once the semaphore is released."""
        self.loader = self.batches = None
        self.end()


def _end_workers(exit_hook: functools.partial) -> None:
    atexit.unregister(exit_hook)
    exit_hook()


class _Passes:
    """The DataLoader's batch sampler: the batches of the pass about to start (a plain list, set by `_Workers`)."""

    def __init__(self) -> None:
        self.items: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.items)


def _release(semaphore: "multiprocessing.synchronize.Semaphore", *, times: int) -> None:
    for _ in range(times):
        semaphore.release()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held pending in this thread (and in the processes it forks) for the block."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: its workers are spawned, not forked
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _init_worker(worker_id: int, *, exiting: "multiprocessing.synchronize.Semaphore") -> None:
    """A DataLoader worker ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches the whole process group, and a
    scheduler's stop (Slurm, systemd's control group) every process, while the main process is the one that acts
    on them, finishing its step and checkpointing (clip/train.py). Forked with them blocked (`_Workers.start_pass`),
    it ignores them before unblocking: one sent while it started is dropped, not a KeyboardInterrupt that ends it.
    The workers end with their DataLoader, when their semaphore is released (`_Workers`), or on their own within
    seconds once the main process is gone without exiting (killed: torch's worker watchdog)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    threading.Thread(target=_exit_when_released, args=(exiting,), name="exit-with-the-main-process",
                     daemon=True).start()


def _exit_when_released(exiting: "multiprocessing.synchronize.Semaphore") -> None:
    exiting.acquire()
    os._exit(0)  # at once: the main process is exiting and reads nothing more


class _TarSamples(torch.utils.data.Dataset):
    """dataset[(epoch, row)] -> uint8 [3, S, S] image, cropped by the loader's `Crops`, resized by its transform."""

    def __init__(self, index: SampleIndex, *, crops: Crops) -> None:
        self.index, self.crops = index, crops

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        epoch, row = item
        data = torch.frombuffer(bytearray(self.index.read(row, "jpg")), dtype=torch.uint8)
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
        return self.crops.transform.resize(image, self.crops.box(epoch, row, *image.shape[1:]))
