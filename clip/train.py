"""`clipcoco train`: the image tower and both heads trained on shards against the cached text vectors.

Inputs: a shard directory (`clipcoco shards`), its text cache (`clipcoco embed-text`), a `Config`.
Output: a run directory: `config.yaml` (resolved), `metrics.jsonl`, `checkpoints/step_XXXXXXXX.pt` +
`checkpoints/latest`, and TensorBoard events under `tensorboard/` when tensorboard is installed (the lines of
metrics.jsonl: clip/runlog.py).

    clipcoco train --shards data/shards/train --text data/shards/train/text.parquet --out runs/r1
    torchrun --nproc_per_node 8 $(which clipcoco) train ...      # DDP, one process per GPU

Per step only the ResNet and the two heads run: the text side comes from the cache, one random caption per image
(`train.captions: one`, from a seeded generator saved in every checkpoint) or all of them (`all`), plus
`train.extra_negatives` captions of other images (clip/negatives.py). With `model.lock_image` the trunk is frozen, and
with `data.image_features` (from `clipcoco embed-images`) the heads train on the two caches without decoding an
image. `train.steps` is the total target: rerunning into the same `--out` resumes from `latest` and continues to
the new target, with the optimizer settings of the new config (clip/rundir.py's SET_AT_START lists what a resume
cannot change). A NaN/Inf loss or weight stops the run before it is logged or saved.

A run is a few components (`Run.parts`: optimizer, schedule, random streams, loader and extra-negative positions),
each with `state_dict()` / `load_state_dict()`: a checkpoint holds the model and the state of every part by name,
and a resume restores each part as it is added to the run (`Run.add`), so a new stateful piece is saved and restored
by adding it. The run directory, the metrics log and the stop signals live in clip/rundir.py, clip/runlog.py and
clip/signals.py; one step in clip/step.py.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clip.checkpoint import Checkpoint, list_checkpoints, resolve_checkpoint
from clip.config import Config
from clip.image_features import FeatureLoader
from clip.inputs import Inputs, open_inputs
from clip.loss import Loss, create_loss
from clip.model import CLIP, build_model, head_form, trunk_sha256
from clip.negatives import ExtraNegatives
from clip.optim import OptimizerState, Schedule, make_optimizer
from clip.parts import PerRank, RandomStreams, Stateful
from clip.rundir import config_changes, find_resume, prepare_run_dir, warn_about_start
from clip.runlog import Meter, RunLog, peak_memory_gb, train_progress
from clip.signals import StopSignals
from clip.step import TextStream, train_step
from pipeline.errors import Interrupted, UserError
from pipeline.loaders import Loader, make_loader
from pipeline.runtime import Runtime, any_rank, barrier, distributed, main_locked

Part = TypeVar("Part", bound=Stateful)


@dataclass
class Run:
    """Everything one training process holds: built fresh, or restored from the checkpoint being resumed."""

    cfg: Config
    out: Path
    env: Runtime
    inputs: Inputs
    model: CLIP
    optimizer: torch.optim.Optimizer
    loader: Loader
    text: TextStream  # the text side of each step: caption vectors and extra negatives
    loss: Loss
    total: int
    step: int
    resume: Checkpoint | None  # the checkpoint each part is restored from as it is added
    parts: dict[str, Stateful] = field(default_factory=dict)  # saved and restored by name (`add`)
    schedule: Schedule = field(init=False)
    step_model: nn.Module = field(init=False)  # the model as stepped: wrapped in DDP and/or torch.compile when asked

    def add(self, name: str, part: Part) -> Part:
        """Make `part` a part of the run: every checkpoint saves its `state_dict()` under `name`, and on a resume it
        is restored now, from the checkpoint's."""
        if self.resume is not None:
            if name not in self.resume.state:
                raise UserError(f"{self.out}'s checkpoint holds no {name} state to resume from: start a new run "
                                "with --overwrite")
            part.load_state_dict(self.resume.state[name])
        self.parts[name] = part
        return part

    @property
    def bf16(self) -> bool:
        return self.env.device.type == "cuda" and self.cfg.train.precision == "bf16"

    @property
    def images_per_step(self) -> int:
        return self.cfg.train.batch_size * self.env.world_size


def open_loader(cfg: Config, inputs: Inputs, env: Runtime) -> Loader:
    """This rank's train loader: over the cached trunk features, or decoding the shards' images."""
    options = dict(batch_size=cfg.train.batch_size, transform=cfg.data.transform(), train=True, device=env.device,
                   seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, threads=cfg.data.threads)
    if inputs.image_features is not None:
        return FeatureLoader(inputs.shards, inputs.image_features, **options)
    return make_loader(inputs.shards, kind=cfg.data.loader, **options)


def build_run(cfg: Config, out: Path, env: Runtime, inputs: Inputs, resume: Checkpoint | None) -> Run:
    torch.manual_seed(cfg.train.seed)
    # A resumed model takes every weight from the checkpoint, heads in its own form: no pretrained download.
    model = (build_model(cfg.model, inputs.text.dim) if resume is None
             else CLIP(cfg.model, inputs.text.dim, heads=head_form(resume.model)))
    # Batches arrive channels_last; weights in the same layout keep convs on the fast path (cuDNN/oneDNN) and
    # gradient strides equal to DDP's buckets.
    model = model.to(env.device, memory_format=torch.channels_last)
    if resume is not None:
        model.load_state_dict(resume.model)
    loader = open_loader(cfg, inputs, env)
    negatives = None
    if cfg.train.extra_negatives:
        if cfg.train.extra_negatives % env.world_size:
            raise UserError(f"--extra-negatives {cfg.train.extra_negatives} is drawn in equal shares by "
                            f"{env.world_size} processes: pass a multiple of {env.world_size}")
        negatives = ExtraNegatives(inputs.text, cfg.train.extra_negatives // env.world_size, seed=cfg.train.seed,
                                   rank=env.rank, world_size=env.world_size)
    total = cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
    caption_rng = torch.Generator().manual_seed(cfg.train.seed * 65_536 + env.rank)
    text = TextStream(inputs.text, every_caption=cfg.train.captions == "all", caption_rng=caption_rng,
                      negatives=negatives, device=env.device)
    run = Run(cfg, out, env, inputs, model, make_optimizer(model, cfg.optim), loader, text,
              create_loss(cfg.model.loss), total, step=0 if resume is None else int(resume.step), resume=resume)
    run.add("optimizer", OptimizerState(run.optimizer))
    run.schedule = run.add("scheduler", Schedule(run.optimizer, warmup=cfg.optim.warmup_steps, total=total))
    run.add("rng", RandomStreams(caption_rng, env.rank))
    run.add("loader", PerRank(loader, env.rank))
    if negatives is not None:
        run.add("negatives", PerRank(negatives, env.rank))
    if inputs.image_features is not None:  # the cached features must be this trunk's (fresh or resumed)
        inputs.image_features.check_trunk(trunk_sha256(model), cfg.model.image_weights)
    run.step_model = model
    if env.world_size > 1:
        on_cuda = env.device.type == "cuda"
        run.step_model = DistributedDataParallel(model, device_ids=[env.device.index] if on_cuda else None)
    if cfg.train.compile:
        run.step_model = torch.compile(run.step_model)
    return run


def save(run: Run) -> Path | None:
    """Checkpoint the model and every part of the run (each rank's share gathered); rank 0 writes the file, and
    every rank returns once it is written."""
    states = {name: part.state_dict() for name, part in run.parts.items()}  # collective: every rank, same order
    saved = None
    if run.env.rank == 0:
        inputs = run.inputs
        saved = Checkpoint(
            model=run.model.state_dict(), config=run.cfg.to_dict(), text_dim=inputs.text.dim,
            text_fingerprint=inputs.text.fingerprint, step=run.step, shards_fingerprint=inputs.shards.fingerprint,
            train_image_ids=torch.as_tensor(inputs.shards.image_ids(), dtype=torch.int64),
            epoch=run.step // run.loader.steps_per_epoch, samples_seen=run.step * run.images_per_step,
            text_model_path=inputs.text.model_path, state=states,
        ).save(run.out, keep_last=run.cfg.train.keep_last)
    # A rank that went on while rank 0 wrote could stop and exit first (torchrun then ends the writer), or resume
    # from the previous `latest` while rank 0 resumes from this one.
    barrier()
    return saved


def periodic_eval(run: Run, log: RunLog) -> dict | None:
    """Score the eval split on rank 0 while the other ranks wait."""
    from clip.embeddings import score_model  # imported here: evaluation pulls in nothing the loop needs otherwise

    result = None
    if run.env.rank == 0:
        cfg, device = run.cfg, run.env.device
        # No progress bar of its own: rich allows one live display at a time and the training bar is up.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
            result = score_model(run.model, shards=run.inputs.eval_shards, text=run.inputs.eval_text, device=device,
                                 loader=cfg.data.loader, batch_size=cfg.train.batch_size,
                                 transform=cfg.data.transform(), threads=cfg.data.threads, progress=False)
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


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def fit(run: Run, log: RunLog, *, progress: bool) -> dict:
    """The loop: sample captions, step, then log / eval / checkpoint when due, until the target step (or a stop
    signal: then checkpoint and raise `Interrupted`)."""
    cfg, meter, window, scores, saved = run.cfg.train, Meter(), {}, None, None
    stop = StopSignals(announce=run.env.main, world_size=run.env.world_size)
    with stop, train_progress(progress and run.env.rank == 0) as bar:
        task = bar.add_task("train", total=run.total, completed=run.step, stats="")
        while run.step < run.total:  # one pass per epoch; a resumed loader starts mid-epoch
            for batch in meter.timed(run.loader):
                text = run.text.batch(batch.image_ids)
                lr = run.optimizer.param_groups[0]["lr"]
                loss = train_step(run.step_model, run.optimizer, run.schedule, batch.images, text, loss=run.loss,
                                  grad_clip=run.cfg.optim.grad_clip, bf16=run.bf16, image_ids=batch.image_ids)
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
                    raise Interrupted(stop.message(run.step, run.total, saved, run.out, run.env.world_size)
                                      if run.env.main else "")
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
        changes = {} if resume is None else config_changes(resume.cfg, cfg)
        if env.main:
            warn_about_start(out, cfg, run.step, run.total, changes)
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
