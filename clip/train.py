"""`clipcoco train`: the image tower and both heads trained on shards against the cached text vectors.

Inputs: a shard directory (`clipcoco shards`), its text cache (`clipcoco embed-text`), a `Config`.
Output: a run directory: `config.yaml` (resolved), `metrics.jsonl`, `checkpoints/step_XXXXXXXX.pt` +
`checkpoints/latest`, and TensorBoard events under `tensorboard/` when tensorboard is installed.
metrics.jsonl holds one JSON object per line: `{"kind": "train", "step", "epoch", "loss", "lr", "temperature",
"images_per_s", "data_wait", "peak_mem_gb"}` every `train.log_every` steps (data_wait: the fraction of wall time
spent waiting for the next batch; peak_mem_gb: GPU memory on CUDA, the process's peak RSS on a CPU),
`{"kind": "eval", "step", ...scores}` after each eval, and `{"kind": "start", "step", "world_size",
"steps_per_epoch", "dropped_per_epoch", "target_step"}` each time a run starts or resumes (a resume adds
`"changed"`: the config keys that differ from the checkpoint's, as [before, now]).

    clipcoco train --shards data/shards/train --text data/shards/train/text.parquet --out runs/r1
    torchrun --nproc_per_node 8 $(which clipcoco) train ...      # DDP, one process per GPU

Per step only the ResNet and the two heads run: the text side comes from the cache, one random caption per image
(`train.captions: one`, from a seeded generator saved in every checkpoint) or all of them (`all`), plus
`train.extra_negatives` captions of other images (clip/negatives.py). With `model.lock_image` the trunk is frozen, and
with `data.image_features` (from `clipcoco embed-images`) the heads train on the two caches without decoding an
image. `train.steps` is the total target: rerunning into the same `--out` resumes from `latest` and continues to
the new target, with the optimizer settings of the new config (SET_AT_START lists what a resume cannot change). A
NaN/Inf loss or weight stops the run before it is logged or saved.
"""

import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from clip.checkpoint import CHECKPOINT_DIR, LATEST, Checkpoint, list_checkpoints, resolve_checkpoint
from clip.config import Config, OptimConfig
from clip.image_features import FeatureLoader, ImageFeatures
from clip.loss import clip_loss
from clip.model import CLIP, build_model, head_form, trunk_sha256
from clip.negatives import ExtraNegatives
from pipeline.errors import Interrupted, UserError
from pipeline.files import write_atomic
from pipeline.loaders import Loader, make_loader
from pipeline.progress import console
from pipeline.runtime import Runtime, any_rank, barrier, distributed, gather_objects, main_locked
from pipeline.shard_reader import ShardSet, open_shards
from pipeline.text_cache import TextCache

RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT_DIR, "tensorboard")
# Config keys that only act when a run starts (the initial weights and temperature): a resume cannot apply another
# value, so it is refused. The model's shape is compared on its own; the loader refuses a change of what fixes its
# order (batch size, seed, image size, crop scale, loader kind). Every other key a resume applies as given.
SET_AT_START = ("model.image_weights", "model.init_temperature", "model.init_logit_bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying biases, norm scales or the temperature only hurts.
    Frozen parameters (a locked trunk) are left out."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at 0-based `step`: linear warmup to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int,
                   step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule, at `step` (a resumed run's: each param group's `initial_lr` is the peak it scales)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup=warmup, total=total),
                                             last_epoch=step - 1)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a saved optimizer's moments and step counts, but keep this config's hyperparameters (lr, weight
    decay, betas, eps): `load_state_dict` would bring back the saved run's, so a resume with a new --lr or
    --weight-decay would silently train with the old ones."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, fresh in zip(optimizer.param_groups, settings, strict=True):
        group.update(fresh, initial_lr=fresh["lr"])  # initial_lr: the peak the rebuilt schedule scales


@dataclass
class TextBatch:
    """The text side of one step, from the caches: [B x K, D] caption vectors (K slots per image, `valid` [B, K]
    saying which hold one; K = 1 and valid None for one caption per image) and optional extra negatives."""

    captions: Tensor
    valid: Tensor | None = None
    extra: Tensor | None = None  # [X, D]
    extra_ids: Tensor | None = None  # [X] int64, the images the extras belong to


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, images: Tensor,
               text: Tensor | TextBatch, *, grad_clip: float, bf16: bool, loss: str = "infonce",
               image_ids: Tensor | None = None) -> Tensor:
    """One optimisation step on a batch of images (or cached trunk features) and their captions' cached vectors,
    `text` a [B, D] tensor (one caption per image) or a TextBatch; returns the loss."""
    if not isinstance(text, TextBatch):
        text = TextBatch(text)
    n_captions = text.captions.shape[0]
    # Captions and extras through the text head in one forward, so DDP sees the head used once.
    rows = text.captions if text.extra is None else torch.cat([text.captions, text.extra])
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        image_feats, text_feats, logit_scale, logit_bias = model(images, rows)
        extra = text_feats[n_captions:] if text.extra is not None else None
        value = clip_loss(image_feats, text_feats[:n_captions], logit_scale, valid=text.valid, extra=extra,
                          image_ids=image_ids, extra_ids=text.extra_ids, kind=loss, bias=logit_bias)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return value.detach()


@dataclass(frozen=True)
class Inputs:
    shards: ShardSet
    text: TextCache
    eval_shards: ShardSet | None
    eval_text: TextCache | None
    image_features: ImageFeatures | None = None


def open_inputs(cfg: Config, origins: dict[str, str] | None = None) -> Inputs:
    """Open and cross-check the shards and text caches before any work starts. A path that does not open is named
    with where it came from (`origins`: the flag, --set or the --config file), where that is known."""
    missing = [what for key, what in (("shards", "--shards DIR (from `clipcoco shards`)"),
                                      ("text", "--text FILE (from `clipcoco embed-text`)"))
               if not getattr(cfg.data, key)]
    if missing:
        raise UserError(f"no training data: pass {' and '.join(missing)}")

    def opened(opener, key: str):
        path = getattr(cfg.data, key)
        try:
            return opener(Path(path))
        except UserError as err:
            origin = (origins or {}).get(f"data.{key}")
            source = f" came from {origin}" if origin else ""
            raise UserError(f"{err} (data.{key} {path}{source}: pass --{key.replace('_', '-')} to use another)") \
                from None

    shards = opened(open_shards, "shards")
    text = opened(TextCache.load, "text")
    text.check_matches(shards)
    eval_shards = eval_text = None
    if cfg.data.eval_shards:
        eval_shards = opened(open_shards, "eval_shards")
        eval_text = opened(TextCache.load, "eval_text")
        eval_text.check_matches(eval_shards)
        if eval_text.fingerprint != text.fingerprint:
            raise UserError(f"eval text cache {eval_text.path} was made with a different text encoder than "
                            f"{text.path} ({_differences(text.fingerprint, eval_text.fingerprint)}): embed the eval "
                            "captions with the same --model and --pooling")
    features = None
    if cfg.data.image_features:
        features = opened(ImageFeatures.load, "image_features")
        features.check(shards, cfg)
    return Inputs(shards, text, eval_shards, eval_text, features)


def _differences(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def config_changes(before: Config, after: Config) -> dict[str, list]:
    """{"section.key": [before, after]} for every key whose value differs."""
    old, new = before.to_dict(), after.to_dict()
    return {f"{section}.{key}": [old[section][key], value] for section, keys in new.items()
            for key, value in keys.items() if old[section][key] != value}


def _shape(model: dict, text_dim: int) -> str:
    locked = ", trunk locked" if model.get("lock_image") else ""
    return (f"{model['image_model']}, embed_dim {model['embed_dim']}, {model['head']} heads, text dim {text_dim}, "
            f"{model.get('loss', 'infonce')} loss{locked}")


def find_resume(out: Path, cfg: Config, inputs: Inputs, world_size: int, *, overwrite: bool) -> Checkpoint | None:
    """The checkpoint to continue from, after checking it belongs to this model, data and process count."""
    if overwrite or not (out / CHECKPOINT_DIR / LATEST).is_file():
        return None
    ckpt = Checkpoint.load(out)
    start_over = "pass --overwrite to start a new run there, or choose another --out"
    if ckpt.optimizer is None or ckpt.loader is None:
        raise UserError(f"{out} holds a checkpoint without training state (it can be scored, not resumed): "
                        f"{start_over}")
    theirs = _shape(ckpt.cfg.to_dict()["model"], int(ckpt.text_dim))
    ours = _shape(cfg.to_dict()["model"], inputs.text.dim)
    if theirs != ours:
        raise UserError(f"{out} holds a run of a different model ({theirs}; this config: {ours}): {start_over}")
    fixed = {k: v for k, v in config_changes(ckpt.cfg, cfg).items() if k in SET_AT_START}
    if fixed:
        raise UserError(f"{out} started with " + ", ".join(f"{k} {old!r} (this config: {new!r})"
                                                            for k, (old, new) in fixed.items())
                        + f", which only acts when a run starts: pass the run's value (its config.yaml) to resume, "
                        f"or {start_over}")
    if ckpt.text_fingerprint != inputs.text.fingerprint:
        raise UserError(f"text cache {inputs.text.path} is not the one {out} was trained with "
                        f"({_differences(ckpt.text_fingerprint, inputs.text.fingerprint)}): pass that run's "
                        f"cache to resume, or {start_over}")
    if ckpt.shards_fingerprint != inputs.shards.fingerprint:
        raise UserError(f"shards {inputs.shards.root} are not the ones {out} was trained on: pass those to resume, "
                        f"or {start_over}")
    if ckpt.world_size != world_size:
        raise UserError(f"{out} was trained with {ckpt.world_size} processes and this run has {world_size}: "
                        f"resume with torchrun --nproc_per_node {ckpt.world_size}, or {start_over}")
    return ckpt


def prepare_run_dir(out: Path, cfg: Config, resume: Checkpoint | None, *, overwrite: bool) -> None:
    """Write the resolved config; keep only the metrics up to the resumed step (a killed run may have logged more)."""
    if overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", cfg.to_yaml().encode())
    metrics = out / "metrics.jsonl"
    kept = []
    if resume is not None and metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= resume.step]
    write_atomic(metrics, "".join(f"{line}\n" for line in kept).encode())


class Meter:
    """Throughput, data-wait fraction and the losses of a logging window; the losses stay on the device until the
    window is read or checked (no sync per step)."""

    def __init__(self) -> None:
        self.last_finite: tuple[int, float] | None = None  # (step, loss) of the newest finite loss checked
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.steps, self.losses = time.perf_counter(), 0.0, [], []

    def add(self, step: int, loss: Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def first_non_finite(self) -> tuple[int, float] | None:
        """(step, loss) of the window's first NaN/Inf loss, or None (the finite ones update `last_finite`)."""
        if not self.losses:
            return None
        values = torch.stack(self.losses).float().cpu().tolist()  # one sync
        for step, value in zip(self.steps, values, strict=True):
            if not math.isfinite(value):
                return step, value
            self.last_finite = step, value
        return None

    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, counting the time spent waiting for each one."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield batch

    def read(self, images_per_step: int) -> dict:
        loss = torch.stack(self.losses).float().mean().item()  # the one sync per window
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"loss": loss, "images_per_s": len(self.steps) * images_per_step / elapsed,
               "data_wait": self.wait / elapsed}
        self.reset()
        return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak resident set (KiB on Linux)


class RunLog:
    """metrics.jsonl lines (and TensorBoard scalars when tensorboard is installed), written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: metrics.jsonl is the record, TensorBoard only a viewer
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def evaluate_now(model: CLIP, cfg: Config, inputs: Inputs, device: torch.device, *, bf16: bool) -> dict:
    from clip.embeddings import score_model  # imported here: evaluation pulls in nothing the loop needs otherwise

    # No progress bar of its own: rich allows one live display at a time and the training bar is up.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return score_model(model, shards=inputs.eval_shards, text=inputs.eval_text, device=device,
                           loader=cfg.data.loader, batch_size=cfg.train.batch_size, image_size=cfg.data.image_size,
                           threads=cfg.data.threads, progress=False)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]train[/] step"), MofNCompleteColumn(), BarColumn(),
                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console(stderr=True),
                    disable=not enabled)


@dataclass
class Run:
    """Everything one training process holds: built fresh, or restored from the checkpoint being resumed."""

    cfg: Config
    out: Path
    env: Runtime
    inputs: Inputs
    model: CLIP
    step_model: nn.Module  # the model as stepped: wrapped in DDP and/or torch.compile when asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Loader
    captions: torch.Generator  # picks each image's caption; one stream per rank
    negatives: ExtraNegatives | None  # this rank's share of the extra text negatives
    total: int
    step: int = 0

    def text_batch(self, image_ids: Tensor) -> TextBatch:
        """The cached text of a step: one caption per image drawn from `captions`, or all of them; the extras."""
        text, device = self.inputs.text, self.env.device
        if self.cfg.train.captions == "all":
            captions, valid = text.all_captions(image_ids, text.max_captions)
            batch = TextBatch(captions.to(device, non_blocking=True), valid)
        else:
            batch = TextBatch(text.sample(image_ids, self.captions).to(device, non_blocking=True))
        if self.negatives is not None:
            extra, extra_ids = self.negatives.draw()
            batch.extra, batch.extra_ids = extra.to(device, non_blocking=True), extra_ids
        return batch

    @property
    def bf16(self) -> bool:
        return self.env.device.type == "cuda" and self.cfg.train.precision == "bf16"

    @property
    def images_per_step(self) -> int:
        return self.cfg.train.batch_size * self.env.world_size


def rank_state(states: Tensor, rank: int) -> Tensor:
    """This rank's generator state from a checkpoint's [world, N] stack (an older checkpoint's one global state is
    every rank's), as a tensor of its own: `Generator.set_state` misreads a view that starts inside its storage, as
    every row but the first does ("Invalid mt19937 state", or a crash)."""
    return (states[rank] if states.ndim == 2 else states).clone()


def build_run(cfg: Config, out: Path, env: Runtime, inputs: Inputs, resume: Checkpoint | None) -> Run:
    torch.manual_seed(cfg.train.seed)
    # A resumed model takes every weight from the checkpoint, heads in its own form: no pretrained download.
    model = (build_model(cfg.model, inputs.text.dim) if resume is None
             else CLIP(cfg.model, inputs.text.dim, heads=head_form(resume.model)))
    # Batches arrive channels_last; weights in the same layout keep convs on the fast path (cuDNN/oneDNN) and
    # gradient strides equal to DDP's buckets.
    model = model.to(env.device, memory_format=torch.channels_last)
    options = dict(batch_size=cfg.train.batch_size, transform=cfg.data.transform(), train=True, device=env.device,
                   seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, threads=cfg.data.threads)
    if inputs.image_features is not None:
        loader = FeatureLoader(inputs.shards, inputs.image_features, **options)
    else:
        loader = make_loader(inputs.shards, kind=cfg.data.loader, **options)
    negatives = None
    if cfg.train.extra_negatives:
        if cfg.train.extra_negatives % env.world_size:
            raise UserError(f"--extra-negatives {cfg.train.extra_negatives} is drawn in equal shares by "
                            f"{env.world_size} processes: pass a multiple of {env.world_size}")
        negatives = ExtraNegatives(inputs.text, cfg.train.extra_negatives // env.world_size, seed=cfg.train.seed,
                                   rank=env.rank, world_size=env.world_size)
    total = cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
    optimizer = make_optimizer(model, cfg.optim)
    captions = torch.Generator().manual_seed(cfg.train.seed * 65_536 + env.rank)
    step = 0
    if resume is not None:
        model.load_state_dict(resume.model)
        load_optimizer_state(optimizer, resume.optimizer)
        torch.set_rng_state(rank_state(resume.rng["torch"], env.rank))
        captions.set_state(rank_state(resume.rng["captions"], env.rank))
        loader.load_state_dict(resume.loader[env.rank])
        if negatives is not None:
            if resume.negatives is None:
                raise UserError(f"{out} was trained without --extra-negatives: resume without it, or start a new run "
                                "with --overwrite")
            negatives.load_state_dict(resume.negatives[env.rank])
        step = int(resume.step)
    if inputs.image_features is not None:  # the cached features must be this trunk's (fresh or resumed)
        inputs.image_features.check_trunk(trunk_sha256(model), cfg.model.image_weights)
    # Rebuilt, not restored: the schedule of this config (peak lr, warmup, total) at the step reached.
    scheduler = make_scheduler(optimizer, warmup=cfg.optim.warmup_steps, total=total, step=step)
    step_model: nn.Module = model
    if env.world_size > 1:
        on_cuda = env.device.type == "cuda"
        step_model = DistributedDataParallel(model, device_ids=[env.device.index] if on_cuda else None)
    if cfg.train.compile:
        step_model = torch.compile(step_model)
    return Run(cfg, out, env, inputs, model, step_model, optimizer, scheduler, loader, captions, negatives, total,
               step)


def save(run: Run) -> Path | None:
    """Checkpoint every rank's loader position, random streams (global and captions) and extra-negative position;
    rank 0 writes the file, and every rank returns once it is written."""
    loader_states = gather_objects(run.loader.state_dict())
    caption_states = gather_objects(run.captions.get_state())
    torch_states = gather_objects(torch.get_rng_state())
    negative_states = gather_objects(run.negatives.state_dict()) if run.negatives is not None else None
    saved = None
    if run.env.rank == 0:
        saved = Checkpoint(
            model=run.model.state_dict(), config=run.cfg.to_dict(), text_dim=run.inputs.text.dim,
            text_fingerprint=run.inputs.text.fingerprint, step=run.step,
            shards_fingerprint=run.inputs.shards.fingerprint,
            train_image_ids=torch.as_tensor(run.inputs.shards.image_ids(), dtype=torch.int64),
            optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
            rng={"torch": torch.stack(torch_states), "captions": torch.stack(caption_states)}, loader=loader_states,
            epoch=run.step // run.loader.steps_per_epoch, samples_seen=run.step * run.images_per_step,
            negatives=negative_states,
            text_model_path=run.inputs.text.model_path,
        ).save(run.out, keep_last=run.cfg.train.keep_last)
    # A rank that went on while rank 0 wrote could stop and exit first (torchrun then ends the writer), or resume
    # from the previous `latest` while rank 0 resumes from this one.
    barrier()
    return saved


def periodic_eval(run: Run, log: RunLog) -> dict | None:
    """Score the eval split on rank 0 while the other ranks wait."""
    result = evaluate_now(run.model, run.cfg, run.inputs, run.env.device, bf16=run.bf16) if run.env.rank == 0 else None
    barrier()
    if result is not None:
        log.write("eval", run.step, result)
    return result


def log_train(run: Run, log: RunLog, meter: Meter, lr: float) -> dict:
    window = meter.read(run.images_per_step)
    log.write("train", run.step, {
        "epoch": run.step / run.loader.steps_per_epoch, "loss": window["loss"], "lr": lr,
        "temperature": 1 / run.model.logit_scale().item(), "images_per_s": window["images_per_s"],
        "data_wait": window["data_wait"], "peak_mem_gb": peak_memory_gb(run.env.device)})
    return window


def stop_if_diverged(run: Run, meter: Meter, *, weights: bool) -> None:
    """Stop at a NaN/Inf loss (and, with `weights`, NaN/Inf weights) before it is logged or saved: the run's last
    good checkpoint stays its latest, and the message says from where to resume and what to change."""
    bad = meter.first_non_finite()
    if bad is not None:
        what = f"the training loss became {bad[1]} at step {bad[0]}"
    elif weights and not bool(torch.stack([p.isfinite().all() for p in run.model.parameters()]).all()):
        what = f"the weights became NaN/Inf by step {run.step}"
    else:
        return
    last = (f"last finite loss {meter.last_finite[1]:.4f} at step {meter.last_finite[0]}"
            if meter.last_finite else "no finite loss before it")
    kept = list_checkpoints(run.out)
    resume = f"rerun with the same --out to resume from {kept[-1].name}" if kept else "rerun with --overwrite"
    optim = run.cfg.optim
    raise UserError(f"{what} ({last}); stopped without saving it: {resume} and a lower --lr (now {optim.lr:g}), a "
                    f"longer --warmup-steps (now {optim.warmup_steps}), --precision fp32 or --set optim.grad_clip "
                    f"(now {optim.grad_clip:g}) (the text cache holds only finite vectors)")
class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while training: noted by the handler, acted on between steps (finish the step,
    checkpoint, stop), so no step is lost. In a single process a second Ctrl-C stops at once (KeyboardInterrupt:
    the steps since the last checkpoint are lost), for a run held up in a long eval or a stalled loader. With
    several processes later signals are noted only, since one rank aborting alone would leave the others waiting
    in a collective (torchrun forwards a Ctrl-C to each rank and kills ranks not done 30 s later; Slurm signals
    every process). Outside the main thread (where Python cannot set handlers) signals keep their default action."""

    def __init__(self, announce: bool, *, world_size: int = 1) -> None:
        self.received: str | None = None
        self.announce, self._saved = announce, {}
        self.second_aborts = world_size == 1

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._saved = {sig: signal.signal(sig, self._note) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            if self.announce:
                again = " (Ctrl-C again stops at once, without it)" if self.second_aborts else ""
                sys.stderr.write(f"\n{self.received}: finishing this step, then saving a checkpoint{again}\n")
        elif signum == signal.SIGINT and self.second_aborts:
            raise KeyboardInterrupt


def resume_command(out: Path, world_size: int) -> str:
    """The command that continues the run in `out` exactly: its resolved config.yaml holds every setting."""
    command = f"train --config {out / 'config.yaml'} --out {out}"
    if world_size == 1:
        return f"clipcoco {command}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = f"--nnodes {world_size // per_node} " if world_size > per_node else ""
    return f"torchrun {nodes}--nproc_per_node {per_node} $(which clipcoco) {command}"


def _stopped(run: Run, stop: StopSignals, saved: Path) -> str:
    signal_name = stop.received or "a stop signal on another rank"
    return (f"stopped by {signal_name} after step {run.step} of {run.total}: saved {saved}; to continue exactly "
            f"where it stopped, run: {resume_command(run.out, run.env.world_size)}")


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def fit(run: Run, log: RunLog, *, progress: bool) -> dict:
    """The loop: sample captions, step, then log / eval / checkpoint when due, until the target step (or a stop
    signal: then checkpoint and raise `Interrupted`)."""
    cfg, meter, window, scores, saved = run.cfg.train, Meter(), {}, None, None
    stop = StopSignals(announce=run.env.main, world_size=run.env.world_size)
    with stop, _progress(progress and run.env.rank == 0) as bar:
        task = bar.add_task("train", total=run.total, completed=run.step, stats="")
        while run.step < run.total:  # one pass per epoch; a resumed loader starts mid-epoch
            for batch in meter.timed(run.loader):
                text = run.text_batch(batch.image_ids)
                lr = run.optimizer.param_groups[0]["lr"]
                loss = train_step(run.step_model, run.optimizer, run.scheduler, batch.images, text,
                                  grad_clip=run.cfg.optim.grad_clip, bf16=run.bf16, loss=run.cfg.model.loss,
                                  image_ids=batch.image_ids)
                run.step += 1
                meter.add(run.step, loss)
                if _due(run.step, cfg.log_every, run.total):
                    stop_if_diverged(run, meter, weights=False)
                    window = log_train(run, log, meter, lr)
                    bar.update(task, completed=run.step, stats=f"loss {window['loss']:.4f}  "
                               f"{window['images_per_s']:.1f} img/s  data-wait {100 * window['data_wait']:.0f}%")
                if run.inputs.eval_shards is not None and _due(run.step, cfg.eval_every, run.total):
                    stop_if_diverged(run, meter, weights=True)
                    scores = periodic_eval(run, log)
                stopping = any_rank(stop.received is not None, run.env)  # every rank stops after the same step
                if run.step >= run.total:  # the target may fall inside the pass that checks the shards' bytes
                    run.loader.finish_check()
                if stopping or _due(run.step, cfg.save_every, run.total):
                    stop_if_diverged(run, meter, weights=True)
                    saved = save(run)
                if stopping and run.step < run.total:
                    raise Interrupted(_stopped(run, stop, saved) if run.env.main else "")
                if run.step >= run.total:
                    break
    return {"run": str(run.out), "step": run.step, "epoch": run.step // run.loader.steps_per_epoch,
            "checkpoint": str(saved) if saved else None, **window, "eval": scores}


def already_done(run: Run) -> dict:
    """A resumed run at (or past) its target: say so, point at its checkpoint, train nothing."""
    if run.env.main:
        where = "its target step" if run.step == run.total else f"step {run.step}, past its target"
        sys.stderr.write(f"{run.out} is already at {where} {run.total}; nothing to do (pass a larger --steps to "
                         "continue)\n")
    return {"run": str(run.out), "step": run.step, "epoch": run.step // run.loader.steps_per_epoch,
            "checkpoint": str(resolve_checkpoint(run.out)), "eval": None}


def train(cfg: Config, *, out: Path, overwrite: bool = False, progress: bool = True,
          origins: dict[str, str] | None = None) -> dict:
    """Train (or resume) the run in `out` up to the target step; returns the final step, loss and eval scores.
    `origins` ({"section.key": "--flag"...}, from `config_origins`) names where a path that does not open came from."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder for the run (it holds config.yaml, metrics.jsonl and "
                        "checkpoints/)")
    # Locked first: what find_resume reads must not change under it (another train into the same --out).
    with main_locked(out, "clipcoco train"), distributed(cfg.train.device) as env:
        inputs = open_inputs(cfg, origins)
        resume = find_resume(out, cfg, inputs, env.world_size, overwrite=overwrite)
        # Built first: a model or loader that cannot be made (no network for the ImageNet weights, say) stops the
        # command before it writes anything into the run directory.
        run = build_run(cfg, out, env, inputs, resume)
        if run.step >= run.total:  # a finished run rerun: nothing to train, nothing rewritten
            return already_done(run)
        if env.main and cfg.optim.warmup_steps >= run.total:
            sys.stderr.write(f"warning: optim.warmup_steps {cfg.optim.warmup_steps} >= the run's {run.total} steps: "
                             f"the learning rate never leaves warmup; pass --warmup-steps below {run.total}\n")
        changes = {} if resume is None else config_changes(resume.cfg, cfg)
        if env.main and changes:  # config.yaml is rewritten: the printed resume command will use these values
            sys.stderr.write(f"resuming {out} at step {run.step} with " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
                + f"; {out / 'config.yaml'} now holds them\n")
        if env.main:
            prepare_run_dir(out, cfg, resume, overwrite=overwrite)
        barrier()  # the run directory is ready before any rank writes into it
        log = RunLog(out, enabled=env.main)
        # The images a train epoch leaves out (partial batches, over all ranks) are counted here once per start.
        # A resume applies the config as given: `changed` records what differs from the checkpoint's.
        changed = {} if resume is None else {"changed": changes}
        log.write("start", run.step, {"world_size": env.world_size, "steps_per_epoch": run.loader.steps_per_epoch,
                                      "dropped_per_epoch": run.loader.dropped_per_epoch, "target_step": run.total,
                                      **changed})
        try:
            return fit(run, log, progress=progress)
        finally:
            log.close()
            run.loader.close()  # its workers end with the run, however it ends
