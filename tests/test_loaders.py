"""Both loaders on generated shards and on coco-mini: batch format, epoch coverage, ranks, exact resume."""

import gc
import json
import sys
import weakref

import numpy as np
import pytest
import torch
from conftest import take, write_coco
from PIL import Image

from clip.config import DataConfig
from pipeline.errors import UserError
from pipeline.loaders import make_loader, resolve_kind
from pipeline.shard_reader import SampleIndex, open_shards
from pipeline.shard_verify import verify_shards
from pipeline.shards import build_shards
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, center_square_box, random_resized_crop_box

KINDS = ["dali", "torch"]
CPU = torch.device("cpu")
N_GENERATED = 23  # prime: no batch size or rank count used here divides it
SIZE = 32
TRANSFORM = DataConfig(image_size=SIZE).transform()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """23 random JPEGs, 12 landscape 72x48 and 11 portrait 40x64, in 5 shards of up to 5."""
    root = tmp_path_factory.mktemp("loaders")
    annotations, images = write_coco(root, 12, size=(72, 48))
    landscape = json.loads(annotations.read_text())
    write_coco(root, N_GENERATED - 12, size=(40, 64), seed=1, first_id=100)  # same folder, rewrites the JSON
    coco = json.loads(annotations.read_text())
    for a in landscape["annotations"]:
        a["id"] += 10_000
    coco["images"] += landscape["images"]
    coco["annotations"] += landscape["annotations"]
    annotations.write_text(json.dumps(coco))
    build_shards(out=root / "shards", images=images, annotations=annotations, samples_per_shard=5, progress=False)
    return open_shards(root / "shards")


def loader(shards, kind, *, train, batch_size=4, threads=2, **options):
    return make_loader(shards, kind=kind, batch_size=batch_size, transform=TRANSFORM, train=train, device=CPU,
                       threads=threads, **options)


def unnormalise(images: torch.Tensor) -> torch.Tensor:
    """Normalised float images back to 0..255 pixel levels."""
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (IMAGENET_STD, IMAGENET_MEAN))
    return images * std + mean


def epoch_ids(batches) -> list[int]:
    return [i for b in batches for i in b.image_ids.tolist()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [True, False])
def test_batch_format_and_normalisation(generated, kind, train):
    batch = next(iter(loader(generated, kind, train=train)))
    assert batch.images.shape == (4, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.image_ids.shape == (4,) and batch.image_ids.dtype == torch.int64 and batch.image_ids.device == CPU
    # Undoing ImageNet normalisation must give back 8-bit pixel values: whole numbers in [0, 255].
    pixels = unnormalise(batch.images)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    torch.testing.assert_close(pixels, pixels.round(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_matches_a_pil_reference(mini, coco_mini, kind):
    """Colour order and geometry against PIL: the center square (side = shorter side) resized to S x S."""
    batch = next(iter(loader(mini, kind, train=False, batch_size=8)))
    pixels = unnormalise(batch.images)
    for image, image_id in zip(pixels, batch.image_ids.tolist(), strict=True):
        pil = Image.open(coco_mini / "val2017" / f"{image_id:012d}.jpg").convert("RGB")
        top, left, h, w = center_square_box(pil.height, pil.width)
        ref = pil.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
        # Resamplers and JPEG decoders differ by a few levels; a one-pixel shift or swapped channels by far more.
        assert (image - ref).abs().mean() < 3, image_id


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data", ["generated", "mini"])
def test_eval_epoch_yields_every_image_once_in_file_order(request, kind, data):
    shards = request.getfixturevalue(data)
    ldr = loader(shards, kind, train=False, batch_size=5)  # 5 divides neither 23 nor 79
    for _ in range(2):
        batches = list(ldr)
        assert len(batches) == ldr.steps_per_epoch == -(-shards.n_images // 5)
        assert [len(b.image_ids) for b in batches[:-1]] == [5] * (len(batches) - 1)
        assert epoch_ids(batches) == shards.image_ids().tolist()  # ids sorted = file order


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data", ["generated", "mini"])
def test_train_epochs_are_full_batches_without_repeats_in_a_new_order(request, kind, data):
    shards = request.getfixturevalue(data)
    ldr = loader(shards, kind, train=True, batch_size=3, seed=5)
    epochs = [list(ldr) for _ in range(2)]
    assert ldr.steps_per_epoch == shards.n_images // 3
    assert ldr.dropped_per_epoch == shards.n_images % 3
    everything = set(shards.image_ids().tolist())
    for batches in epochs:
        ids = epoch_ids(batches)
        assert len(batches) == ldr.steps_per_epoch and all(len(b.image_ids) == 3 for b in batches)
        assert len(set(ids)) == len(ids) == ldr.steps_per_epoch * 3 and set(ids) <= everything
    assert epoch_ids(epochs[0]) != epoch_ids(epochs[1])
    again = take(loader(shards, kind, train=True, batch_size=3, seed=5), 2)
    assert epoch_ids(again) == epoch_ids(epochs[0][:2])
    torch.testing.assert_close(again[0].images, epochs[0][0].images, atol=0, rtol=0)
    assert epoch_ids(take(loader(shards, kind, train=True, batch_size=3, seed=6), 2)) != epoch_ids(epochs[0][:2])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_disjoint_images_covering_the_split(generated, kind, train, world_size):
    ranks = [loader(generated, kind, train=train, batch_size=3, rank=r, world_size=world_size)
             for r in range(world_size)]
    for _ in range(2):
        seen = [epoch_ids(list(ldr)) for ldr in ranks]
        flat = [i for ids in seen for i in ids]
        assert len(flat) == len(set(flat))
        if train:
            assert {len(ids) for ids in seen} == {ranks[0].steps_per_epoch * 3}  # every rank steps together
            assert len(flat) + ranks[0].dropped_per_epoch == N_GENERATED
        else:
            assert sorted(flat) == generated.image_ids().tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("train", "stop"), [(True, 2), (True, 7), (True, 9), (False, 3)])
def test_resume_yields_exactly_what_an_uninterrupted_loader_would(generated, kind, train, stop, tmp_path):
    """Stop after `stop` batches (7 = the end of a train epoch, 9 = into the next), save, restore, continue."""
    uninterrupted = loader(generated, kind, train=train, batch_size=3, seed=3)
    straight = take(uninterrupted, stop + 6)
    first = loader(generated, kind, train=train, batch_size=3, seed=3)
    take(first, stop)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = loader(generated, kind, train=train, batch_size=3, seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    rest = take(resumed, 6)
    assert [b.image_ids.tolist() for b in rest] == [b.image_ids.tolist() for b in straight[stop:]]
    for a, b in zip(rest, straight[stop:], strict=True):
        torch.testing.assert_close(a.images, b.images, atol=0, rtol=0)  # the same random crops too
    assert (resumed.epoch, resumed.batch) == (uninterrupted.epoch, uninterrupted.batch)


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_from_a_different_loader_is_refused(generated, kind):
    state = loader(generated, kind, train=True, batch_size=3).state_dict()
    with pytest.raises(UserError, match="batch_size"):
        loader(generated, kind, train=True, batch_size=4).load_state_dict(state)


def test_dali_and_torch_give_the_same_eval_images(mini):
    """The same crop box in both; only the JPEG decoders and resamplers differ."""
    dali, torch_ = (list(loader(mini, kind, train=False, batch_size=16)) for kind in KINDS)
    assert epoch_ids(dali) == epoch_ids(torch_)
    diff = (unnormalise(torch.cat([b.images for b in dali])) - unnormalise(torch.cat([b.images for b in torch_])))
    assert diff.abs().mean() < 1  # measured 0.13 levels on coco-mini at 64 px; a one-pixel shift gives ~6
    assert diff.abs().mean(dim=(1, 2, 3)).max() < 2


def test_user_mistakes_are_refused_with_what_to_do(generated, monkeypatch):
    with pytest.raises(UserError, match="dali, torch"):
        loader(generated, "pil", train=False)
    with pytest.raises(UserError, match="lower --batch-size"):
        loader(generated, "torch", train=True, batch_size=12, world_size=2)
    with pytest.raises(UserError, match="outside world size"):
        loader(generated, "torch", train=False, rank=2, world_size=2)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import now raises ImportError, as without the wheel
    with pytest.raises(UserError, match=r"clipcoco\[dali\].*--loader torch"):
        loader(generated, "dali", train=False)


def test_random_resized_crop_box_stays_in_range():
    rng = np.random.default_rng(0)
    for height, width in [(48, 72), (64, 40), (480, 640), (10, 1000)]:
        for _ in range(200):
            top, left, h, w = random_resized_crop_box(height, width, scale=(0.5, 1.0), rng=rng)
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width and h > 0 and w > 0
            if (height, width) != (10, 1000):  # a crop that fits is always found for ordinary shapes
                assert 0.5 * height * width * 0.9 <= h * w and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # Too wide for any allowed aspect ratio: the fallback is the centered 4:3 box.
    assert random_resized_crop_box(10, 1000, scale=(0.9, 1.0), rng=rng) == (0, 493, 10, 13)


def test_center_square_box():
    assert center_square_box(48, 72) == (0, 12, 48, 48)
    assert center_square_box(65, 40) == (12, 0, 40, 40)


def test_close_ends_the_workers_and_the_loader_goes_on(generated):
    """`with loader:` (what train uses) shuts the persistent workers down however the block ends, even while a
    traceback still holds the loader; the loader can be iterated again, from where it was."""
    import multiprocessing

    ldr = loader(generated, "torch", train=True, threads=2)
    with pytest.raises(ZeroDivisionError), ldr:
        next(iter(ldr))
        assert len(multiprocessing.active_children()) == 2
        1 / 0  # noqa: B018
    assert multiprocessing.active_children() == []
    rest = list(ldr)
    assert len(rest) == ldr.steps_per_epoch - 1 and len(multiprocessing.active_children()) == 2
    ldr.close()
    assert multiprocessing.active_children() == []


_STOP_SIGNALS_THEN_EXIT = """
import multiprocessing, os, signal, sys, time, torch
import pipeline.loaders
from pipeline.loaders import make_loader
from pipeline.shard_reader import SampleIndex, open_shards
from pipeline.transforms import ImageTransform
if sys.argv[2] == "starting":  # the second worker is still starting when the signals come (once a CI race)
    init = pipeline.loaders._init_worker
    pipeline.loaders._init_worker = lambda worker_id, **kw: (worker_id and time.sleep(2), init(worker_id, **kw))
ldr = make_loader(open_shards(sys.argv[1]), kind="torch", batch_size=4, transform=ImageTransform(16, 0.9),
                  train=True, device=torch.device("cpu"), threads=2)
batches = iter(ldr)
next(batches)
for sig in (signal.SIGINT, signal.SIGTERM):  # noted, as clipcoco train notes them
    signal.signal(sig, lambda signum, _: print(signal.Signals(signum).name, flush=True))
os.killpg(0, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
for pid in [os.getpid(), *(p.pid for p in multiprocessing.active_children())]:
    os.kill(pid, signal.SIGTERM)  # a scheduler's stop (Slurm, systemd): every process
print(len(list(batches)) + 1, flush=True)  # the epoch goes on: the workers were spared
keep = (ldr, iter(ldr), next(iter(ldr)))  # alive at exit: the exit must end the workers itself
"""


@pytest.mark.parametrize("workers", ["started", "starting"])
def test_stop_signals_spare_the_workers_and_the_exit_still_ends_them(generated, workers):
    """SIGINT to the process group and SIGTERM to every process reach the main process only in effect (the workers
    ignore them, so the main process can finish its step), also while a worker is still starting; a process that
    exits with its loader's workers still alive exits at once (it once waited forever: multiprocessing's exit handler
    ends workers with the SIGTERM they ignore, so the loader ends them first)."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _STOP_SIGNALS_THEN_EXIT, str(generated.root), workers],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    steps = loader(generated, "torch", train=True).steps_per_epoch
    assert proc.returncode == 0 and out.split() == ["SIGINT", "SIGTERM", str(steps)], (out, err)


def test_close_ends_the_workers_while_torchs_iterator_is_still_held(generated):
    """What `close` ends does not depend on what else refers to torch's iterator (an error's traceback, through its
    frames or a chained error's: it once kept a failed pass's workers alive, and the exit waited for them)."""
    import multiprocessing
    import time

    ldr = loader(generated, "torch", train=True, threads=2)
    next(iter(ldr))
    held = ldr._workers.batches
    ldr.close()
    deadline = time.monotonic() + 20
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []
    del held


def test_torch_loader_workers_are_freed_without_the_garbage_collector(generated):
    """No reference cycle keeps the persistent workers: a cycle leaves them to gc, which waits 5 s per worker."""
    gc.disable()
    try:
        ldr = loader(generated, "torch", train=True)
        list(ldr)
        unfinished = iter(ldr)
        next(unfinished)
        workers = weakref.ref(ldr._workers)
        del ldr, unfinished
        assert workers() is None
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """120 tiny JPEGs in 4 shards of 30, in image-id order as every shard directory is."""
    root = tmp_path_factory.mktemp("many")
    annotations, images = write_coco(root, 120, captions_per_image=1, size=(20, 16))
    build_shards(out=root / "shards", images=images, annotations=annotations, samples_per_shard=30, progress=False)
    return open_shards(root / "shards")


@pytest.mark.parametrize("kind", KINDS)
def test_train_order_is_a_global_shuffle_every_epoch(many, kind):
    """Batches as a fresh global permutation per epoch makes them: batch-mates rarely meet again, a batch spans the
    split (not a run of neighbours in the tars), the first batch changes."""
    from clip.apps.bench import batch_mate_repetition, order_statistics

    ldr = loader(many, kind, train=True, batch_size=8, seed=0, threads=1)
    epochs = [[b.image_ids.tolist() for b in ldr] for _ in range(3)]
    ideal = 7 / 119
    for first, second in zip(epochs, epochs[1:], strict=False):
        assert batch_mate_repetition(first, second) <= 1.5 * ideal
        assert sorted(first[0]) != sorted(second[0])
    shards_per_batch = [len({(i - 1) // 30 for i in batch}) for batch in epochs[0]]
    assert np.mean(shards_per_batch) >= 3  # 3.6 expected of 8 images drawn from 4 shards at random
    stats = order_statistics(ldr)  # what `clipcoco bench loader` reports: the same order, from the loader's rows
    assert stats["batch_mate_repetition"] == pytest.approx(batch_mate_repetition(*epochs[:2]), abs=1e-5)
    assert stats["ideal_repetition"] == pytest.approx(ideal, abs=1e-5) and stats["first_batch_changes"]


def test_repetition_statistic_against_a_hand_count():
    from clip.apps.bench import batch_mate_repetition

    # Image 1's mates {2, 3} -> {2}: 1 of 2 again; 2: {1, 3} -> {1}: 1 of 2; 3: {1, 2} -> {4}: 0; 4, 5, 6 likewise.
    assert batch_mate_repetition([[1, 2, 3], [4, 5, 6]], [[1, 2, 4], [3, 5, 6]]) == pytest.approx(4 / 12)
    assert batch_mate_repetition([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == 1.0


@pytest.mark.parametrize("world_size", [1, 2])
def test_both_loaders_share_one_order_and_one_crop_per_sample(generated, world_size):
    """Same seed -> the same image ids in every batch and the same crop box, on every rank, in every epoch."""
    batches = {kind: [[b for b in ldr] for _ in range(2)]
               for kind in KINDS
               for ldr in [loader(generated, kind, train=True, batch_size=3, seed=4, world_size=world_size)]}
    dali, torch_ = (sum(batches[k], []) for k in KINDS)
    assert [b.image_ids.tolist() for b in dali] == [b.image_ids.tolist() for b in torch_]
    diff = unnormalise(torch.cat([b.images for b in dali])) - unnormalise(torch.cat([b.images for b in torch_]))
    assert diff.abs().mean() < 2  # decoders and resamplers differ by a few levels; another box by far more


def test_a_position_saved_by_the_old_dali_reader_is_refused(generated):
    old = loader(generated, "torch", train=True, batch_size=3).state_dict()
    old["dali"] = "a DALI reader checkpoint"
    with pytest.raises(UserError, match="before 0.2 .* cannot restore: start the run again with --overwrite"):
        loader(generated, "dali", train=True, batch_size=3).load_state_dict(old)


def test_auto_is_dali_on_cuda_and_torch_on_a_cpu():
    assert resolve_kind("auto", torch.device("cpu")) == "torch"
    assert resolve_kind("auto", torch.device("cuda", 0)) == "dali"
    assert resolve_kind("dali", torch.device("cpu")) == "dali"
    assert resolve_kind("torch", torch.device("cuda")) == "torch"
    with pytest.raises(UserError, match="use one of auto, dali, torch"):
        resolve_kind("pil", torch.device("cpu"))


def _copy(shards, tmp_path):
    import shutil

    shutil.copytree(shards.root, tmp_path / "copy")
    return tmp_path / "copy"


def _record_as_written(root, tar: str) -> None:
    """Give `tar`'s sidecar and manifest entry its present sha256, as if it had been written with its damage."""
    from pipeline.files import sha256_file

    digest = sha256_file(root / tar)
    sidecar = json.loads((root / tar).with_suffix(".json").read_text())
    (root / tar).with_suffix(".json").write_text(json.dumps({**sidecar, "sha256": digest}))
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["tar"] == tar:
            entry["sha256"] = digest
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS)
def test_an_index_that_disagrees_with_the_manifest_is_refused(generated, kind, tmp_path):
    """What a second `clipcoco shards` into the same folder used to leave: a .idx listing fewer samples than the
    manifest counts, which DALI would have read as a shorter epoch."""
    root = _copy(generated, tmp_path)
    idx = root / "shard-000001.idx"
    header, *samples = idx.read_text().splitlines()
    idx.write_text("\n".join([f"v1.2 {len(samples) - 1}", *samples[:-1]]) + "\n")
    with pytest.raises(UserError, match=r"list 22 samples but its manifest counts 23 \(shard-000001.tar: 4 in its "
                                        r"\.idx, 5 in the manifest\): check the folder with `clipcoco shards --verify"):
        loader(open_shards(root), kind, train=False)


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_id_member_names_the_shard(generated, kind, tmp_path):
    """Not "image N is not in the text cache": the id member disagrees with its key, and the shard is named."""
    root = _copy(generated, tmp_path)
    fields = (root / "shard-000002.idx").read_text().splitlines()[2].split()
    offset = int(fields[fields.index("id") + 1])
    with open(root / "shard-000002.tar", "r+b") as tar:  # a valid id, another image's: only the key can tell
        tar.seek(offset)
        tar.write(b"000000000999")
    _record_as_written(root, "shard-000002.tar")  # wrong before its sha256 was taken: the shard check cannot tell
    with pytest.raises(UserError, match=r"sample \d{12} in .*shard-000002.tar has a damaged id member "
                                        r"\(b'000000000999', not its key\): check the folder with `clipcoco shards "
                                        r"--verify .*copy`") as err:
        list(loader(open_shards(root), kind, train=False))
    assert len(str(err.value).splitlines()) == 1
    # The traceback holds the stopped DALI pipeline; a DataLoader worker forked later would tear it down and hang.
    del err
    gc.collect()
    with pytest.raises(UserError, match="shard-000002.tar: sample .* has an id or json image_id that disagrees"):
        verify_shards(root, progress=False)


def _overwrite_jpeg(root, tar: str, data: bytes) -> None:
    """Write `data`, zero-padded, over the first JPEG of `tar` (its size and every tar header stay as they were)."""
    fields = (root / tar).with_suffix(".idx").read_text().splitlines()[1].split()
    offset, size = int(fields[fields.index("jpg") + 1]), int(fields[fields.index("jpg") + 2])
    assert len(data) <= size
    with open(root / tar, "r+b") as f:
        f.seek(offset)
        f.write(data.ljust(size, b"\0"))


def _smallest_jpeg(shards) -> bytes:
    with SampleIndex.load(shards.indexes) as index:
        return index.read(int(index.members["jpg"][:, 1].argmin()), "jpg")


@pytest.mark.parametrize("kind", KINDS)
def test_a_shard_damaged_without_a_change_of_size_stops_a_train_epoch(generated, kind, tmp_path):
    """Another real JPEG in a sample's place decodes fine: only the shard's sha256 can tell."""
    root = _copy(generated, tmp_path)
    _overwrite_jpeg(root, "shard-000003.tar", _smallest_jpeg(generated))
    with pytest.raises(UserError, match=r"^\S*copy/shard-000003.tar is damaged: its bytes are not the ones `clipcoco "
                                        r"shards` wrote .*: check the folder with `clipcoco shards --verify \S*copy`"):
        list(loader(open_shards(root), kind, train=True))
    gc.collect()  # the traceback held a DALI pipeline


def test_a_run_that_stops_inside_the_first_pass_still_hears_of_the_damage(generated, tmp_path, monkeypatch):
    """train's target can fall inside an epoch: it stops reading mid-pass and asks for the check before its last
    checkpoint, as clip/train.py's fit does. The hash is held until then, as a large shard's would still run."""
    import threading

    import pipeline.shard_reader as shard_reader

    root = _copy(generated, tmp_path)
    _overwrite_jpeg(root, "shard-000003.tar", _smallest_jpeg(generated))
    stopped, real = threading.Event(), shard_reader.sha256_file
    monkeypatch.setattr(shard_reader, "sha256_file", lambda path: stopped.wait(60) and real(path))
    reader = loader(open_shards(root), "torch", train=True, threads=1)
    for _, _batch in zip(range(2), reader, strict=False):
        pass  # two steps, then the run is at its target
    stopped.set()
    with pytest.raises(UserError, match="shard-000003.tar is damaged"):
        reader.finish_check()
    reader.close()


def test_a_process_hashes_a_shard_once_unless_it_changes(generated, tmp_path, monkeypatch):
    """A train run's periodic eval makes a new loader over the eval shards each time: they are hashed once."""
    import pipeline.shard_reader as shard_reader

    root = _copy(generated, tmp_path)
    hashed = []
    real = shard_reader.sha256_file
    monkeypatch.setattr(shard_reader, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    for _ in range(2):
        list(loader(open_shards(root), "torch", train=False, threads=1))
    assert sorted(hashed) == [f"shard-00000{i}.tar" for i in range(5)]
    _overwrite_jpeg(root, "shard-000003.tar", _smallest_jpeg(generated))
    with pytest.raises(UserError, match="shard-000003.tar is damaged"):
        list(loader(open_shards(root), "torch", train=False, threads=1))


def test_ranks_share_the_shard_check_and_the_rank_holding_the_damage_stops(generated, tmp_path):
    root = _copy(generated, tmp_path)
    _overwrite_jpeg(root, "shard-000004.tar", _smallest_jpeg(generated))
    shards = open_shards(root)
    ranks = [loader(shards, "torch", train=True, rank=r, world_size=2, threads=1) for r in range(2)]
    checked = [set(r.shards_to_check()) for r in ranks]
    assert checked[0] | checked[1] == set(range(5)) and len(checked[0]) < 5 and len(checked[1]) < 5
    assert len(list(ranks[0])) == ranks[0].steps_per_epoch  # shard 4 is not rank 0's to check
    with pytest.raises(UserError, match="shard-000004.tar is damaged"):
        list(ranks[1])


@pytest.mark.parametrize("kind", KINDS)
def test_a_jpeg_that_no_longer_decodes_is_explained_by_the_shard_check(generated, kind, tmp_path):
    """Bit rot that breaks a JPEG fails its decoding (in a worker, or in DALI) before the check is done: the error
    is the damaged shard's one line, not the decoder's traceback."""
    root = _copy(generated, tmp_path)
    jpeg = bytearray(_smallest_jpeg(generated))
    jpeg[len(jpeg) // 3:] = bytes(len(jpeg) - len(jpeg) // 3)  # the entropy-coded data and the end marker zeroed
    _overwrite_jpeg(root, "shard-000000.tar", bytes(jpeg[:-1]))
    with pytest.raises(UserError, match="shard-000000.tar is damaged"):
        list(loader(open_shards(root), kind, train=False))
    gc.collect()


@pytest.mark.parametrize("kind", KINDS)
def test_an_index_that_lost_a_digit_of_a_size_is_refused_before_reading(generated, kind, tmp_path):
    root = _copy(generated, tmp_path)
    idx = root / "shard-000001.idx"
    fields = idx.read_text().splitlines()[3].split()
    offset, size = fields[fields.index("jpg") + 1], fields[fields.index("jpg") + 2]
    idx.write_text(idx.read_text().replace(f"jpg {offset} {size} ", f"jpg {offset} {size[:-1]} "))
    key = fields[3].split(".")[0]
    with pytest.raises(UserError, match=rf"^\S*copy/shard-000001.idx does not match its tar at sample {key}'s jpg "
                                        rf"member \(offset {offset}, size {size[:-1]}, or the next one's offset\): "
                                        r"check the folder with `clipcoco shards --verify \S*copy` and rebuild it"):
        loader(open_shards(root), kind, train=True)


def test_an_exif_rotated_jpeg_is_upright_in_both_loaders(tmp_path):
    """A portrait photo stored landscape with EXIF orientation 6 (as cameras write them): packed upright, so
    DALI (which applies EXIF) and torchvision (which does not) decode the same pixels."""
    upright = np.zeros((64, 48, 3), np.uint8)  # 64 high, 48 wide: red top half, blue bottom half
    upright[:32, :, 0] = 255
    upright[32:, :, 2] = 255
    annotations, images = write_coco(tmp_path, 1, captions_per_image=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show": the stored pixels are the upright ones turned back
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(images / "000000000001.jpg", exif=exif,
                                                                       quality=95)
    build_shards(out=tmp_path / "shards", images=images, annotations=annotations, progress=False)
    shards = open_shards(tmp_path / "shards")
    dali, torch_ = (unnormalise(list(loader(shards, kind, train=False, threads=1))[0].images)[0] for kind in KINDS)
    assert (dali - torch_).abs().mean() < 2
    for image in (dali, torch_):  # the eval crop: the center 48 x 48, red above blue
        top, bottom = image[:, : SIZE // 3].mean(dim=(1, 2)), image[:, -SIZE // 3:].mean(dim=(1, 2))
        assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50, (top, bottom)


_FAIL_THEN_EXIT = """
import sys, torch
from pipeline.loaders import make_loader
from pipeline.shard_reader import open_shards
from pipeline.transforms import ImageTransform
ldr = make_loader(open_shards(sys.argv[1]), kind="torch", batch_size=4, transform=ImageTransform(16, 0.9),
                  train=False, device=torch.device("cpu"), threads=2)
batches = iter(ldr)  # named: a traceback keeps it, mid-pass, until the interpreter is gone
next(batches)
if sys.argv[2] == "dropped":  # let go of without `close` (as `clipcoco bench` does), then a normal exit
    del batches, ldr
    sys.exit(0)
if sys.argv[2] == "worker":
    list(batches)  # a JPEG of shard-000001 does not decode: the worker's error, uncaught
raise RuntimeError("the training loop failed")  # uncaught, the workers still serving the pass
"""


@pytest.mark.parametrize(("end", "code", "says"), [("worker", 1, "DataLoader worker"),
                                                   ("loop", 1, "the training loop failed"), ("dropped", 0, "")])
def test_the_process_exits_at_once_and_takes_the_workers(generated, tmp_path, end, code, says):
    """After a worker's error or an error in the loop that iterates the loader, left uncaught with the pass still
    referred to (by its traceback), or after a loader let go of without `close`, the process exits at once and no
    worker outlives it."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    root = _copy(generated, tmp_path)
    jpeg = bytearray(_smallest_jpeg(generated))
    jpeg[len(jpeg) // 3:] = bytes(len(jpeg) - len(jpeg) // 3)
    _overwrite_jpeg(root, "shard-000001.tar", bytes(jpeg[:-1]))
    _record_as_written(root, "shard-000001.tar")  # the shard check passes: the decoder's error is what stops it
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _FAIL_THEN_EXIT, str(root), end], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code and says in err, err
    with pytest.raises(ProcessLookupError):  # nothing of its session is left: the workers went with it
        os.killpg(proc.pid, 0)
