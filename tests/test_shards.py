"""`clipcoco shards`: round trip (tiny data and coco-mini, read back through DALI), determinism,
every bad-input case, crash safety (kill -9 then rerun), refusal, the failure budget, --verify."""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_coco
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from pipeline.errors import UserError
from pipeline.images import jpeg_frame_type
from pipeline.shard_reader import open_shards
from pipeline.shard_verify import verify_shards
from pipeline.shards import build_shards

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).with_name("assets")


def _build(ann, images, out, **kw):
    kw.setdefault("workers", 1)
    return build_shards(out=out, images=images, annotations=ann, progress=False, **kw)


def _files(root: Path) -> dict[str, bytes]:
    """Every file a build wrote except manifest.json (the one place for paths and timings)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != "manifest.json"}


def _samples(shards) -> dict[int, dict]:
    """image id -> {member: bytes} of every sample, reading the tars with tarfile."""
    samples: dict[int, dict] = {}
    for tar in shards.tars:
        with tarfile.open(tar) as tf:
            for info in tf:
                assert info.mtime == 0 and info.uid == 0 and info.gid == 0 and info.mode == 0o444
                key, ext = info.name.split(".", 1)
                samples.setdefault(int(key), {})[ext] = tf.extractfile(info).read()
    return samples


def _dali_read(shards) -> list[tuple[int, tuple[int, ...]]]:
    """(image id, decoded HWC shape) of every sample, through DALI's webdataset reader and CPU decoder."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpg, ids = fn.readers.webdataset(paths=[str(t) for t in shards.tars],
                                         index_paths=[str(i) for i in shards.indexes], ext=["jpg", "id"],
                                         dtypes=[types.UINT8, types.UINT8], missing_component_behavior="error",
                                         name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), ids

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    got: list[tuple[int, tuple[int, ...]]] = []
    while len(got) < n:
        images, ids = p.run()
        got += [(int(np.array(ids.at(i)).tobytes()), tuple(images.at(i).shape)) for i in range(len(ids))]
    return got[:n]


def _check_against_json(shards, expected_captions: dict[int, list[str]]) -> dict[int, dict]:
    samples = _samples(shards)
    assert list(samples) == sorted(expected_captions)
    for image_id, sample in samples.items():
        assert list(sample) == ["id", "jpg", "json", "txt"]
        assert sample["id"] == f"{image_id:012d}".encode("ascii")  # the key's digits: webdataset and DALI read it
        meta = json.loads(sample["json"])
        assert meta["image_id"] == image_id and meta["captions"] == expected_captions[image_id]
        assert sample["txt"].decode("utf-8") == expected_captions[image_id][0]
    table = pq.read_table(shards.root / "captions.parquet").to_pylist()
    assert table == [{"image_id": i, "caption_id": c, "caption": t}
                     for i in sorted(expected_captions)
                     for c, t in zip(json.loads(samples[i]["json"])["caption_ids"], expected_captions[i], strict=True)]
    np.testing.assert_array_equal(shards.image_ids(), sorted(expected_captions))
    # DALI, as the trainer uses it, reads and decodes every sample through the .idx files.
    dali = _dali_read(shards)
    assert [i for i, _ in dali] == list(samples)
    for image_id, shape in dali:
        meta = json.loads(samples[image_id]["json"])
        assert shape == (meta["height"], meta["width"], 3)
    return samples


def _captions_of(ann: Path) -> dict[int, list[str]]:
    coco = json.loads(ann.read_text())
    out: dict[int, list[str]] = {}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        out.setdefault(a["image_id"], []).append(a["caption"])
    return out


def test_round_trip_tiny(tiny_coco, tmp_path):
    ann, images = tiny_coco
    manifest = _build(ann, images, tmp_path / "s", samples_per_shard=5)
    shards = open_shards(tmp_path / "s")
    assert [t.name for t in shards.tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [i.name for i in shards.indexes] == ["shard-000000.idx", "shard-000001.idx", "shard-000002.idx"]
    assert shards.n_images == 12 and [e["count"] for e in manifest["shards"]] == [5, 5, 2]
    assert manifest["totals"]["captions_packed"] == 60 and manifest["totals"]["images_left_out"] == 0
    samples = _check_against_json(shards, _captions_of(ann))
    for image_id, sample in samples.items():  # valid JPEGs are packed byte for byte
        assert sample["jpg"] == (images / f"{image_id:012d}.jpg").read_bytes()
    assert (tmp_path / "s" / "failures.jsonl").read_bytes() == b""
    assert verify_shards(tmp_path / "s", progress=False)["images"] == 12


def test_tars_are_webdatasets_own(tiny_coco, tmp_path):
    """Byte for byte what webdataset.TarWriter writes for the same samples, and read back by webdataset."""
    import webdataset

    ann, images = tiny_coco
    _build(ann, images, tmp_path / "s", samples_per_shard=5)
    shards = open_shards(tmp_path / "s")
    for tar in shards.tars:
        with tarfile.open(tar) as tf:
            members = [(info.name.split(".", 1), tf.extractfile(info).read()) for info in tf]
        samples: dict[str, dict] = {}
        for (key, ext), data in members:
            samples.setdefault(key, {"__key__": key})[ext] = data
        reference = io.BytesIO()
        with webdataset.TarWriter(reference, user="", group="", mode=0o444, mtime=0, encoder=False) as writer:
            for sample in samples.values():
                writer.write(sample)
        assert tar.read_bytes() == reference.getvalue()
    # webdataset's default decoders, every member (they read any `.id` member as a text integer).
    read = list(webdataset.WebDataset([str(t) for t in shards.tars], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in read] == [f"{i:012d}" for i in sorted(_captions_of(ann))]
    for s in read:
        assert s["txt"] == s["json"]["captions"][0] and s["jpg"].size == (s["json"]["width"], s["json"]["height"])
        assert s["id"] == s["json"]["image_id"] and isinstance(s["id"], int)


def _odd_tar(path: Path) -> None:
    """A tar with what wds2idx's rules are about: a directory entry, nested and multi-dot names, a hidden file,
    a symlink, a name without a dot, samples whose members are not adjacent. (Not a GNU long name: wds2idx points
    such a member at its name block, write_index at its data; the shards' ustar names are short.)"""
    def add(tf, name, data=b"", kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mtime = kind, len(data), 0
        if kind == tarfile.SYMTYPE:
            info.linkname = "a/000001.jpg"
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        add(tf, "a", kind=tarfile.DIRTYPE)
        add(tf, "a/000001.jpg", b"x" * 700)
        add(tf, "a/000001.seg.png", b"y" * 3)
        add(tf, "a/.hidden.txt", b"h")
        add(tf, "a/000001.cls", b"1")
        add(tf, "a/link.jpg", kind=tarfile.SYMTYPE)
        add(tf, "b.c/000002.txt", b"two")
        add(tf, "README", b"no dot")
        add(tf, "a/000001.txt", b"again")


def test_idx_is_what_dalis_wds2idx_writes(tiny_coco, tmp_path):
    """write_index needs no DALI, and gives wds2idx's bytes on the shards and on a tar with the odd cases."""
    wds2idx = pytest.importorskip("wds2idx")
    from pipeline.shards import write_index

    ann, images = tiny_coco
    _build(ann, images, tmp_path / "s", samples_per_shard=5)
    odd = tmp_path / "odd.tar"
    _odd_tar(odd)
    for tar in [*sorted((tmp_path / "s").glob("*.tar")), odd]:
        ours, theirs = tmp_path / "ours.idx", tmp_path / "theirs.idx"
        write_index(tar, ours)
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert ours.read_bytes() == theirs.read_bytes(), tar.name
        if tar != odd:
            assert ours.read_bytes() == tar.with_suffix(".idx").read_bytes()
    assert (tmp_path / "ours.idx").read_text().splitlines()[0] == "v1.2 4"  # the odd tar: 4 samples


def test_shards_needs_no_dali(tiny_coco, tmp_path, monkeypatch):
    """Without DALI (its modules unimportable) `clipcoco shards` and `--verify` still write and check the .idx."""
    for name in ("nvidia.dali", "nvidia.dali.fn", "wds2idx"):
        monkeypatch.setitem(sys.modules, name, None)
    ann, images = tiny_coco
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["shards", "--annotations", str(ann), "--images", str(images), "--out", str(out),
                                      "--samples-per-shard", "5", "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.idx")) == ["shard-000000.idx", "shard-000001.idx", "shard-000002.idx"]
    assert verify_shards(out, progress=False)["images"] == 12


def test_coco_mini_packs_only_listed_images(coco_mini, tmp_path):
    ann = coco_mini / "annotations" / "captions_val2017.json"
    listed = {im["id"] for im in json.loads(ann.read_text())["images"]}
    assert len(list((coco_mini / "val2017").glob("*.jpg"))) > len(listed)  # the unlisted extras are there
    manifest = _build(ann, coco_mini / "val2017", tmp_path / "val", samples_per_shard=32, workers=2)
    assert manifest["totals"]["images_listed"] == manifest["totals"]["images_packed"] == len(listed)
    shards = open_shards(tmp_path / "val")
    samples = _check_against_json(shards, _captions_of(ann))
    assert set(samples) == listed


def _jpeg(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_coco(tmp_path_factory):
    """Tiny COCO data with one image per bad-input case; returns (annotations, images, expected)."""
    root = tmp_path_factory.mktemp("bad")
    ann, images = write_coco(root, n_images=15)
    rng = np.random.default_rng(1)
    good = (images / "000000000001.jpg").read_bytes()
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    (images / "000000000002.jpg").write_bytes(os.urandom(3000))  # random bytes
    (images / "000000000003.jpg").write_bytes(good[:700] + rng.bytes(4000))  # garbage after the header
    (images / "000000000004.jpg").write_bytes(b"")  # zero length
    (images / "000000000005.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "000000000006.jpg").unlink()  # listed, missing
    Image.fromarray(rgb).save(images / "000000000007.jpg", format="PNG")  # PNG named .jpg
    Image.fromarray(rgb).convert("CMYK").save(images / "000000000008.jpg", format="JPEG")  # CMYK JPEG
    (images / "000000000009.jpg").write_bytes(_jpeg(rgb[..., 0]))  # grayscale: kept
    (images / "000000000010.jpg").write_bytes(_jpeg(rgb, progressive=True))  # progressive: kept
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated by 90 degrees: re-encoded upright (64 high, 48 wide), without EXIF
    (images / "000000000014.jpg").write_bytes(_jpeg(rgb, exif=exif))
    # arithmetic-coded (made once with `jpegtran -arithmetic`, 64x48): decodable, but not by the GPU decoders
    shutil.copy(ASSETS / "arithmetic.jpg", images / "000000000015.jpg")
    (images / "999999.jpg").write_bytes(good)  # not listed: ignored
    coco = json.loads(ann.read_text())
    for a in coco["annotations"]:
        if a["image_id"] == 11:  # every caption whitespace-only: left out
            a["caption"] = " \t\n"
        elif a["image_id"] == 12 and a["id"] % 2:  # some whitespace-only: dropped, the rest kept
            a["caption"] = "   "
        elif a["image_id"] == 13:  # kept byte-exact: unicode, surrounding spaces, long
            a["caption"] = f"  Ünïcödé 猫 café {a['id']} " + "long " * 200
    ann.write_text(json.dumps(coco))
    return ann, images


BAD_REASONS = {2: "undecodable", 3: "undecodable", 4: "empty", 5: "undecodable", 6: "missing", 11: "no_caption"}


def test_bad_inputs_left_out_or_reencoded(bad_coco, tmp_path):
    ann, images = bad_coco
    manifest = _build(ann, images, tmp_path / "s", samples_per_shard=4, max_failure_rate=1.0)
    failures = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert {f["image_id"]: f["reason"] for f in failures} == BAD_REASONS
    assert all(f["file_name"] == f"{f['image_id']:012d}.jpg" and f["detail"] for f in failures)
    totals = manifest["totals"]
    assert totals["images_listed"] == 15 and totals["images_packed"] == 9 and totals["images_left_out"] == 6
    assert totals["left_out_by_reason"] == {"empty": 1, "missing": 1, "no_caption": 1, "undecodable": 3}
    # image 11: all 5 dropped; image 12: caption ids 1055..1059, the 3 odd ones dropped
    assert totals["captions_dropped"] == 5 + 3 and totals["captions_packed"] == 9 * 5 - 3
    assert totals["images_reencoded"] == 4
    expected = {i: [c for c in caps if c.strip()] for i, caps in _captions_of(ann).items() if i not in BAD_REASONS}
    samples = _check_against_json(open_shards(tmp_path / "s"), expected)
    for image_id in (7, 8, 14, 15):  # re-encoded as plain RGB JPEGs without EXIF (14: turned upright)
        assert jpeg_frame_type(samples[image_id]["jpg"]) == 0xC0
        with Image.open(io.BytesIO(samples[image_id]["jpg"])) as im:
            size = (48, 64) if image_id == 14 else (64, 48)
            assert (im.format, im.mode, im.size, dict(im.getexif())) == ("JPEG", "RGB", size, {})
    for image_id in (9, 10):
        assert samples[image_id]["jpg"] == (images / f"{image_id:012d}.jpg").read_bytes()
    meta = json.loads(samples[14]["json"])
    assert (meta["width"], meta["height"]) == (48, 64)


def test_jpeg_frame_type():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert jpeg_frame_type(_jpeg(rgb)) == 0xC0
    assert jpeg_frame_type(_jpeg(rgb, progressive=True)) == 0xC2
    assert jpeg_frame_type((ASSETS / "arithmetic.jpg").read_bytes()) == 0xC9
    assert jpeg_frame_type(_jpeg(rgb)[:40]) is None  # cut before its frame header
    assert jpeg_frame_type(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame


def test_deterministic_across_workers_and_out(bad_coco, tmp_path):
    ann, images = bad_coco
    kw = {"samples_per_shard": 3, "max_failure_rate": 1.0, "resize_shorter": 32, "quality": 80}
    _build(ann, images, tmp_path / "a", workers=1, **kw)
    _build(ann, images, tmp_path / "elsewhere" / "b", workers=2, **kw)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "elsewhere" / "b")
    assert a == b and "shard-000002.tar" in a
    assert str(tmp_path).encode() not in b"".join(a.values())  # no absolute paths outside manifest.json
    shards = open_shards(tmp_path / "a")
    assert shards.fingerprint == open_shards(tmp_path / "elsewhere" / "b").fingerprint
    for image_id, shape in _dali_read(shards):  # shorter side 32, aspect kept, EXIF rotation applied (14)
        assert shape == ((43, 32, 3) if image_id == 14 else (32, 43, 3)), image_id


def test_resize_never_upscales(tiny_coco, tmp_path):
    ann, images = tiny_coco
    manifest = _build(ann, images, tmp_path / "s", resize_shorter=100)
    assert manifest["totals"]["images_reencoded"] == 0
    samples = _samples(open_shards(tmp_path / "s"))
    assert samples[1]["jpg"] == (images / "000000000001.jpg").read_bytes()


def test_failure_budget_writes_everything_then_fails(bad_coco, tmp_path):
    ann, images = bad_coco
    with pytest.raises(UserError, match=r"6 of 15 listed images .*\(undecodable: 3.*--max-failure-rate"):
        _build(ann, images, tmp_path / "s", max_failure_rate=0.25)
    assert open_shards(tmp_path / "s").n_images == 9
    assert len((tmp_path / "s" / "failures.jsonl").read_text().splitlines()) == 6
    _build(ann, images, tmp_path / "s", max_failure_rate=0.5)  # same bytes, so no refusal; within budget


def test_missing_inputs_fail_before_work(tiny_coco, tmp_path):
    ann, images = tiny_coco
    with pytest.raises(UserError, match="--images .*no such folder"):
        _build(ann, tmp_path / "nope", tmp_path / "s")
    with pytest.raises(UserError, match="--annotations .*no such file"):
        _build(tmp_path / "nope.json", images, tmp_path / "s")
    with pytest.raises(UserError, match="exactly one of --annotations"):
        build_shards(out=tmp_path / "s", images=images, progress=False)
    assert not (tmp_path / "s").exists()


def test_rerun_skips_refuses_and_overwrites(tiny_coco, tmp_path):
    ann, images = tiny_coco
    out = tmp_path / "s"
    _build(ann, images, out, samples_per_shard=5)
    first = _files(out)
    (out / "text-cache.parquet").write_bytes(b"another stage's file")
    _build(ann, images, out, samples_per_shard=5, workers=2)  # same options: nothing to redo
    assert _files(out) == {**first, "text-cache.parquet": b"another stage's file"}
    with pytest.raises(UserError, match=r"different inputs or options \(resize_shorter\).*--overwrite"):
        _build(ann, images, out, samples_per_shard=5, resize_shorter=32)
    _build(ann, images, out, samples_per_shard=4, overwrite=True)
    assert [t.name for t in open_shards(out).tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert (out / "text-cache.parquet").exists()


def test_rerun_after_crash_removes_leftovers(tiny_coco, tmp_path):
    ann, images = tiny_coco
    _build(ann, images, tmp_path / "ref", samples_per_shard=5)
    out = tmp_path / "s"
    _build(ann, images, out, samples_per_shard=5)
    # What a crash leaves: a complete shard 0, shard 1 without its sidecar, a half-written tar.
    for name in ("manifest.json", "captions.parquet", "failures.jsonl", "shard-000001.json", "shard-000002.json"):
        (out / name).unlink()
    (out / "shard-000002.tar").rename(out / "shard-000002.tar.tmp")
    (out / "shard-000001.tar").write_bytes(b"half")
    with pytest.raises(UserError, match="did you run"):
        open_shards(out)
    _build(ann, images, out, samples_per_shard=5)
    assert _files(out) == _files(tmp_path / "ref")


KILL_SCRIPT = "import sys; from cli.main import main; sys.argv[0] = 'clipcoco'; main()"


def test_kill_9_then_rerun_is_byte_identical(tmp_path):
    ann, images = write_coco(tmp_path / "coco", n_images=150, captions_per_image=1, size=(320, 320))
    args = ["shards", "--annotations", str(ann), "--images", str(images), "--samples-per-shard", "5",
            "--resize-shorter", "160", "--workers", "1", "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args, "--out", str(out)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (out / "shard-000001.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be killed: give it more images"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    first_shard = (out / "shard-000000.tar").stat().st_ino
    rerun = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert rerun.exit_code == 0, rerun.output
    assert (out / "shard-000000.tar").stat().st_ino == first_shard  # kept, not rewritten
    _build(ann, images, tmp_path / "ref", samples_per_shard=5, resize_shorter=160)
    assert _files(out) == _files(tmp_path / "ref")


def test_verify_catches_a_shard_cut_at_a_member_boundary(tiny_coco, tmp_path):
    ann, images = tiny_coco
    out = tmp_path / "s"
    _build(ann, images, out, samples_per_shard=5)
    runner = CliRunner()
    ok = runner.invoke(app, ["shards", "--verify", str(out)])
    assert ok.exit_code == 0 and "ok: 3 shards, 12 images" in ok.output
    # Cut shard 1 just before its last sample's header: tarfile reads the rest without an error.
    last_sample = (out / "shard-000001.idx").read_text().splitlines()[-1].split()
    cut = int(last_sample[1]) - 512
    tar = out / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:cut])
    with tarfile.open(tar) as tf:
        assert len(tf.getnames()) == 4 * 4
    with pytest.raises(UserError, match="shard-000001.tar: 4 samples, its sidecar says 5"):
        verify_shards(out, progress=False)
    with pytest.raises(UserError, match="manifest says"):
        open_shards(out)
    # Same size, one byte of a JPEG changed: only the sha256 can tell.
    tar0 = out / "shard-000000.tar"
    data = bytearray(tar0.read_bytes())
    data[2000] ^= 0xFF
    tar0.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-000000.tar: sha256 or size differs"):
        verify_shards(out, progress=False)


def test_a_cut_captions_parquet_is_listed_by_verify_and_a_rerun_rewrites_it(tiny_coco, tmp_path, monkeypatch, capsys):
    from test_cli import run_main

    ann, images = tiny_coco
    out = tmp_path / "s"
    _build(ann, images, out, samples_per_shard=5)
    good = (out / "captions.parquet").read_bytes()
    (out / "captions.parquet").write_bytes(good[:-64])
    with pytest.raises(UserError, match=r"1 problem\(s\) in .*\n  .*captions.parquet cannot be read \(ArrowInvalid: "
                                        r".*rerun the `clipcoco shards` command that wrote"):
        verify_shards(out, progress=False)
    code, err = run_main(monkeypatch, capsys, "shards", "--verify", str(out), "--no-progress")  # as a user sees it
    assert code == 2 and err.startswith(f"error: 1 problem(s) in {out}") and "Traceback" not in err, err
    _build(ann, images, out, samples_per_shard=5)  # the same command again: the advice holds
    assert (out / "captions.parquet").read_bytes() == good
    assert verify_shards(out, progress=False)["ok"]


def test_cli_builds_and_prints_a_summary(tiny_coco, tmp_path):
    ann, images = tiny_coco
    result = CliRunner().invoke(app, ["shards", "--annotations", str(ann), "--images", str(images),
                                      "--out", str(tmp_path / "s"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "packed 12 images (0 left out) into 1 shards" in result.output
    assert "images/s" in result.output
    refused = CliRunner().invoke(app, ["shards", "--annotations", str(ann), "--images", str(images),
                                       "--out", str(tmp_path / "s"), "--quality", "80", "--resize-shorter", "8"])
    assert isinstance(refused.exception, UserError) and "--overwrite" in str(refused.exception)


def test_shards_and_verify_do_not_import_torch(tiny_coco, tmp_path):
    """Packing needs no torch, and importing it costs seconds per run (2 s here; the shard reader once imported it
    for DALI's id batches, and `clipcoco shards` took twice as long as before for it)."""
    ann, images = tiny_coco
    out = tmp_path / "s"
    code = ("import sys\nfrom cli.main import main\n"
            "for args in (['--annotations', sys.argv[1], '--images', sys.argv[2], '--out', sys.argv[3]],\n"
            "             ['--verify', sys.argv[3]]):\n"
            "    sys.argv = ['clipcoco', 'shards', '--workers', '2', *args]\n"
            "    try:\n        main()\n    except SystemExit as exit:\n        assert not exit.code, exit.code\n"
            "    assert 'torch' not in sys.modules, args[0]\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ann), str(images), str(out)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert open_shards(out).n_images == 12


def test_karpathy_trainval(tmp_path):
    from test_coco import SPLITS, write_karpathy

    karpathy = write_karpathy(tmp_path / "coco")
    result = CliRunner().invoke(app, ["shards", "--karpathy", str(karpathy), "--split", "trainval", "--images",
                                      str(tmp_path / "coco"), "--out", str(tmp_path / "s"), "--no-progress"])
    assert result.exit_code == 0, result.output
    shards = open_shards(tmp_path / "s")
    assert shards.manifest["inputs"]["split"] == "trainval"
    samples = _samples(shards)
    assert sorted(samples) == sorted(SPLITS["train"] + SPLITS["restval"])
    raw = {im["cocoid"]: sorted(im["sentences"], key=lambda s: s["sentid"])
           for im in json.loads(karpathy.read_text())["images"]}
    for image_id, sample in samples.items():
        meta = json.loads(sample["json"])
        assert meta["caption_ids"] == [s["sentid"] for s in raw[image_id]]
        assert meta["captions"] == [s["raw"] for s in raw[image_id]]
        folder = "train2014" if image_id in SPLITS["train"] else "val2014"
        assert meta["file_name"] == f"{folder}/COCO_{folder}_{image_id:012d}.jpg"
        assert (meta["width"], meta["height"]) == (56, 40)
        assert sample["jpg"] == (tmp_path / "coco" / meta["file_name"]).read_bytes()


def test_checked_turns_results_into_samples_and_failures():
    from pipeline.coco import ImageRecord
    from pipeline.images import Prepared, Rejected
    from pipeline.shards import checked

    def record(image_id, captions):
        return ImageRecord(image_id, f"{image_id}.jpg", Path(f"{image_id}.jpg"), 4, 3, captions,
                           tuple(range(10, 10 + len(captions))))

    ok = Prepared(b"\xff\xd8jpeg", 4, 3, reencoded=True)
    items = list(checked(iter([(record(7, ("a", "  ", "b")), ok), (record(8, ("x",)), Rejected("empty", "zero")),
                               (record(9, ("\n",)), ok)])))
    (sample, reencoded), failure, no_caption = items
    assert reencoded and sample["__key__"] == "000000000007" and sample["txt"] == b"a" and sample["jpg"] == ok.jpeg
    assert sample["id"] == b"000000000007"  # format 2: the key's digits
    assert json.loads(sample["json"]) == {"image_id": 7, "file_name": "7.jpg", "width": 4, "height": 3,
                                          "captions": ["a", "b"], "caption_ids": [10, 12]}
    assert failure == {"image_id": 8, "file_name": "8.jpg", "reason": "empty", "detail": "zero"}
    assert no_caption["reason"] == "no_caption"


def _square(x: int) -> int:
    return x * x


def test_bounded_imap_keeps_order_and_bounds_work_in_flight():
    import contextlib
    import multiprocessing

    from pipeline.shards import bounded_imap

    pulled: list[int] = []

    def tasks():
        for i in range(50):
            pulled.append(i)
            yield i

    with multiprocessing.get_context("fork").Pool(2) as pool, \
            contextlib.closing(bounded_imap(pool, _square, tasks(), window=8)) as results:
        first = [next(results) for _ in range(3)]
        time.sleep(0.3)
        assert len(pulled) <= 3 + 8 + 1  # 8 in flight beyond the 3 consumed, one more waiting for a slot
        assert first + list(results) == [i * i for i in range(50)]
        abandoned = bounded_imap(pool, _square, iter(range(1000)), window=8)
        next(abandoned)
        abandoned.close()  # the pool's feeder thread must stop, or terminating the pool would hang
        with pytest.raises(ValueError, match="chunksize"):  # a chunk larger than the window would never be sent
            next(bounded_imap(pool, _square, iter(range(10)), window=4, chunksize=8))


def test_a_write_error_stops_the_workers_and_a_rerun_recovers(tiny_coco, tmp_path, monkeypatch, capsys):
    from test_cli import run_main

    from pipeline.shards import ShardWriter

    ann, images = tiny_coco
    real_add = ShardWriter.add

    def add_then_fail(self, sample, reencoded):
        if sample["__key__"] == "000000000008":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
        real_add(self, sample, reencoded)

    monkeypatch.setattr(ShardWriter, "add", add_then_fail)
    with pytest.raises(OSError, match="No space left"):  # and no hang: the pool shuts down
        _build(ann, images, tmp_path / "s", samples_per_shard=5, workers=2)
    # Nothing of the shard being written is left to fill the disk further; the complete shard before it is kept.
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*")) == [f"shard-000000.{e}" for e in ("idx", "json",
                                                                                                      "tar")]
    # What the user sees: one line naming the shard being written and what to do, exit 2.
    code, err = run_main(monkeypatch, capsys, "shards", "--annotations", str(ann), "--images", str(images), "--out",
                         str(tmp_path / "s"), "--samples-per-shard", "5", "--workers", "1", "--no-progress")
    assert code == 2 and err == (f"error: {tmp_path / 's' / 'shard-000001.tar.tmp'}: No space left on device: free "
                                 "space on that disk or write somewhere else (another --out)\n"), err
    monkeypatch.setattr(ShardWriter, "add", real_add)
    _build(ann, images, tmp_path / "s", samples_per_shard=5, workers=2)
    _build(ann, images, tmp_path / "ref", samples_per_shard=5)
    assert _files(tmp_path / "s") == _files(tmp_path / "ref")


def test_a_disk_that_fills_while_a_shard_is_closed_leaves_no_part_of_it(tiny_coco, tmp_path, monkeypatch):
    """The tar is complete and renamed, then its .idx (or sidecar) finds the disk full: the tar goes too, as a shard
    without its sidecar is no shard."""
    import pipeline.shards as shards_module

    ann, images = tiny_coco

    def full(tar, idx):
        Path(idx).write_bytes(b"v1.2")
        raise OSError(errno.ENOSPC, "No space left on device", str(idx))

    monkeypatch.setattr(shards_module, "write_index", full)
    with pytest.raises(OSError, match="No space left"):
        _build(ann, images, tmp_path / "s", samples_per_shard=5, workers=1)
    assert list((tmp_path / "s").glob("shard-*")) == []


def _reason_of(out: Path) -> dict[int, str]:
    return {f["image_id"]: f["reason"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


def test_every_listed_image_is_packed_or_left_out_and_every_count_adds_up(tmp_path):
    ann, images = write_coco(tmp_path / "coco", 8, captions_per_image=2)
    coco = json.loads(ann.read_text())
    for image, new_id in zip(coco["images"][:3], (-1, 2**63, 10**12), strict=True):  # ids no 12-digit key holds
        for a in coco["annotations"]:
            a["image_id"] = new_id if a["image_id"] == image["id"] else a["image_id"]
        image["id"] = new_id
    invisible = "\u200b\u2060 \ufeff\u200e"  # zero-width space, word joiner, BOM, left-to-right mark
    coco["annotations"][-1]["caption"] = invisible  # one of image 8's two captions: dropped, counted
    coco["annotations"][-4]["caption"] = coco["annotations"][-3]["caption"] = invisible  # all of image 7's
    coco["annotations"].append({"id": 5000, "image_id": 777, "caption": "an image nobody listed"})
    ann.write_text(json.dumps(coco))
    out = tmp_path / "s"
    totals = _build(ann, images, out, samples_per_shard=2, max_failure_rate=1.0)["totals"]
    assert _reason_of(out) == {-1: "bad_id", 2**63: "bad_id", 10**12: "bad_id", 7: "no_caption"}
    assert (totals["images_listed"], totals["images_packed"], totals["images_left_out"]) == (8, 4, 4)
    assert totals["captions_listed"] == 17 and totals["captions_without_image"] == 1
    assert (totals["captions_packed"], totals["captions_dropped"], totals["captions_left_out"]) == (7, 3, 6)
    assert verify_shards(out, progress=False)["images"] == 4
    assert _build(ann, images, out, samples_per_shard=2, max_failure_rate=1.0)["totals"] == totals  # resumed

    # A manifest whose totals do not add up is refused by --verify ...
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["totals"]["images_listed"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "failures.jsonl").write_text("".join((out / "failures.jsonl").read_text().splitlines(True)[1:]))
    with pytest.raises(UserError, match=r"totals do not add up: 9 images listed but 4 packed \+ 4 left out = 8"
                                        r"(.|\n)*failures.jsonl lists 3 images, the manifest says 4"):
        verify_shards(out, progress=False)


def test_a_manifest_that_loses_an_image_is_never_written(tiny_coco, tmp_path, monkeypatch):
    import pipeline.shards as shards_module

    real = shards_module.checked
    monkeypatch.setattr(shards_module, "checked", lambda results: (item for i, item in enumerate(real(results))
                                                                    if i != 3))  # a bug that drops one image
    with pytest.raises(RuntimeError, match=r"internal error, manifest.json not written: 12 images listed but 11 "
                                           r"packed \+ 0 left out = 11; .*unaccounted: \[4\]"):
        _build(ann := tiny_coco[0], tiny_coco[1], tmp_path / "s")
    assert not (tmp_path / "s" / "manifest.json").exists() and ann.is_file()


def test_a_caption_that_is_not_unicode_writes_nothing(tiny_coco, tmp_path):
    ann, images = tiny_coco
    ann.write_text(ann.read_text().replace('"image 3 caption 1"', r'"image 3 \udc80 caption 1"'))
    with pytest.raises(UserError, match=r"annotations\[11\] has a 'caption' that is not valid Unicode"):
        _build(ann, images, tmp_path / "s")
    assert not (tmp_path / "s").exists()  # no folder, so no stale .tar.tmp either


def test_file_names_outside_images_are_refused_unless_allowed(tiny_coco, tmp_path):
    ann, images = tiny_coco
    coco = json.loads(ann.read_text())
    shutil.copy(images / "000000000001.jpg", images.parent / "outside.jpg")
    coco["images"][0]["file_name"] = "../outside.jpg"
    ann.write_text(json.dumps(coco))
    result = CliRunner().invoke(app, ["shards", "--annotations", str(ann), "--images", str(images), "--out",
                                      str(tmp_path / "s"), "--no-progress"])
    assert isinstance(result.exception, UserError) and "--allow-outside-images" in str(result.exception)
    result = CliRunner().invoke(app, ["shards", "--annotations", str(ann), "--images", str(images), "--out",
                                      str(tmp_path / "s"), "--no-progress", "--allow-outside-images"])
    assert result.exit_code == 0, result.output
    assert open_shards(tmp_path / "s").n_images == 12


def test_a_fifo_a_device_and_a_folder_are_left_out_without_being_read(tiny_coco, tmp_path):
    ann, images = tiny_coco
    coco = json.loads(ann.read_text())
    (images / "000000000002.jpg").unlink()
    os.mkfifo(images / "000000000002.jpg")  # opening it for reading would wait for a writer forever
    coco["images"][2]["file_name"] = "/dev/zero"  # reading it would never end
    (images / "000000000004.jpg").unlink()
    (images / "000000000004.jpg").mkdir()
    ann.write_text(json.dumps(coco))

    def hung(*_):
        raise TimeoutError("shards waited on a non-regular file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        _build(ann, images, tmp_path / "s", max_failure_rate=1.0, allow_outside_images=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    failures = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert [(f["image_id"], f["reason"], f["detail"]) for f in failures] == [
        (2, "not_a_file", "a FIFO, not a regular file"), (3, "not_a_file", "a device, not a regular file"),
        (4, "not_a_file", "a folder, not a regular file")]


def test_a_rerun_packs_an_image_repaired_after_it_was_left_out(tiny_coco, tmp_path):
    ann, images = tiny_coco
    good = (images / "000000000007.jpg").read_bytes()
    (images / "000000000007.jpg").write_bytes(good[:300])  # truncated: left out of shard 1 (images 6..10)
    out = tmp_path / "s"
    with pytest.raises(UserError, match=r"fix the inputs and rerun the same command \(it retries them\)"):
        _build(ann, images, out, samples_per_shard=5)
    assert _reason_of(out) == {7: "undecodable"}
    inodes = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}
    with pytest.raises(UserError, match="were left out"):  # still broken: nothing rebuilt
        _build(ann, images, out, samples_per_shard=5)
    assert {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")} == inodes
    (images / "000000000007.jpg").write_bytes(good)  # fixed
    manifest = _build(ann, images, out, samples_per_shard=5)
    assert manifest["totals"]["images_packed"] == 12 and _reason_of(out) == {}
    assert (out / "shard-000000.tar").stat().st_ino == inodes["shard-000000.tar"]  # before the repaired image: kept
    _build(ann, images, tmp_path / "ref", samples_per_shard=5)
    assert _files(out) == _files(tmp_path / "ref")  # what a fresh build of the fixed inputs gives


def _gradient_png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))).save(buf, format="PNG")
    return buf.getvalue()


def _tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.tile(values, (8, 1))).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("make", [
    _gradient_png16,
    lambda: _tiff(np.linspace(0, 2**31 - 1, 256).astype(np.int32)),
    lambda: _tiff(np.linspace(0, 1, 256).astype(np.float32)),
], ids=["png-16-bit", "tiff-int32", "tiff-float32"])
def test_deep_images_keep_their_tones(make, tmp_path):
    from pipeline.images import Prepared, prepare_image

    (tmp_path / "deep.jpg").write_bytes(make())
    prepared = prepare_image(tmp_path / "deep.jpg")
    assert isinstance(prepared, Prepared) and prepared.reencoded
    with Image.open(io.BytesIO(prepared.jpeg)) as im:
        columns = np.asarray(im.convert("L"), dtype=np.float64).mean(axis=0)
    assert np.abs(columns - np.linspace(0, 255, 256)).max() < 8  # a gradient, not 99 % white
    assert abs(columns.mean() - 127.5) < 2 and (np.diff(columns[::8]) > 0).all()


def test_transparent_images_are_laid_over_white(tmp_path):
    from pipeline.images import prepare_image

    la = np.zeros((16, 32, 2), np.uint8)
    la[:, 16:, 1] = 255  # black, transparent on the left half, opaque on the right
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    palette = Image.new("P", (32, 16), 0)
    palette.putpalette([0, 0, 0, 0, 0, 0])  # two blacks; index 0 (the left half) is transparent
    palette.paste(1, (16, 0, 32, 16))
    palette.save(tmp_path / "p.png", transparency=0)
    for name in ("la.png", "p.png"):
        with Image.open(io.BytesIO(prepare_image(tmp_path / name).jpeg)) as im:
            pixels = np.asarray(im.convert("L"), dtype=np.float64)
        assert pixels[:, :14].mean() > 250 and pixels[:, 18:].mean() < 5, name
