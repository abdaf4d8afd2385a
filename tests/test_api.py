"""`clip.load`: the API embeds an eval image as `clipcoco eval` did and a caption as its cached vector through the
text head; paths, PIL images and uint8 tensors embed alike; the frozen text encoder loads only for texts."""

import dataclasses
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_evaluate import TEXT_DIM, make_run
from test_search import evaluated_run
from torchvision.io import decode_jpeg

import clip.api as api_module
from clip import CLIPModel, load
from clip.embeddings import load_image_embeddings
from pipeline.errors import UserError
from pipeline.loaders import make_loader
from pipeline.shard_reader import SampleIndex, open_shards
from pipeline.text_cache import TextCache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, shards dir, text cache, {image id: its JPEG file as packed in the shards})."""
    root = tmp_path_factory.mktemp("api")
    run_dir, shards, text = evaluated_run(root)
    jpgs = root / "jpgs"
    jpgs.mkdir()
    files = {}
    with SampleIndex.load(open_shards(shards).indexes) as index:
        for image_id in range(700, 706):
            files[image_id] = jpgs / f"{image_id}.jpg"
            files[image_id].write_bytes(index.sample(image_id)["jpg"])
    return run_dir, shards, text, files


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def test_image_embedding_is_the_one_eval_saved(run):
    run_dir, _, _, files = run
    ids, saved, _ = load_image_embeddings(run_dir / "embeddings-val.parquet")
    model = load(run_dir, device="cpu")
    got = model.encode_images([files[int(i)] for i in ids])
    assert got.shape == saved.shape == (6, model.embed_dim) and got.dtype == torch.float32
    assert cosine(got, saved).min() >= 0.9999
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6))


def test_one_transform_reaches_both_loaders_and_the_api(run):
    """The run's `ImageTransform` is the one description the torch loader, the DALI loader and the API apply: a
    change of it (the size and the normalisation here) reaches all three alike."""
    run_dir, shards, _, files = run
    model = load(run_dir, device="cpu")
    model.transform = dataclasses.replace(model.transform, size=model.transform.size + 8, mean=(0.1, 0.9, 0.5),
                                          std=(0.5, 0.1, 0.3))
    transform, ids = model.transform, sorted(files)
    api = model.encode_images([files[i] for i in ids])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (transform.mean, transform.std))
    for kind, agreement in [("torch", 0.9999), ("dali", 0.999)]:  # DALI: another JPEG decoder and resampler
        with make_loader(open_shards(shards), kind=kind, batch_size=64, transform=transform, train=False,
                         device=torch.device("cpu"), threads=1) as loader:
            batches = list(loader)
        images = torch.cat([b.images for b in batches])
        order = torch.cat([b.image_ids for b in batches]).tolist()
        assert images.shape[1:] == (3, transform.size, transform.size)
        pixels = images * std + mean  # whole 8-bit levels only when undone with this transform's mean and std
        torch.testing.assert_close(pixels, pixels.round(), atol=2e-3, rtol=0)
        with torch.inference_mode():
            embedded = model.module.encode_image(images[[order.index(i) for i in ids]]).float()
        assert cosine(embedded, api).min() >= agreement, kind


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 [H, W] (grayscale) or [H, W, 3] (RGB) pixels: PIL writes only the grayscale kind."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\0" + row.tobytes() for row in pixels.astype(">u2").reshape(height, -1))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def scene(height: int, width: int) -> np.ndarray:
    """float [H, W, 3] in [0, 1]: smooth ramps and a white block in a corner, so a turn or a tone change shows."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    picture = np.stack([x, y, np.sqrt(x * y)], axis=-1)
    picture[: height // 3, : width // 4] = 1.0
    return picture


def exif_rotated_jpeg(upright: np.ndarray) -> bytes:
    """A JPEG of uint8 [H, W, 3] `upright` stored turned a quarter (W high), with EXIF orientation 6 to show it upright,
    as cameras write portrait photos."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    out = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """(run dir, {image id: its original file}) after `clipcoco eval` on shards of a plain JPEG (900), an
    EXIF-rotated JPEG (901), a 16-bit grayscale PNG (902) and a 16-bit RGB PNG (903): the shards re-encode the
    last three as upright 8-bit JPEGs."""
    root = tmp_path_factory.mktemp("awkward")
    deep = np.rint(scene(30, 40) * 65535).astype(np.uint16)  # 16-bit tones, not 8-bit ones times 257
    files = {901: exif_rotated_jpeg(np.rint(scene(44, 30) * 255).astype(np.uint8)),
             902: png16(deep[..., 1]), 903: png16(deep)}
    run_dir, _, _ = evaluated_run(root, 4, 900, files=files)
    originals = root / "originals"
    originals.mkdir()
    paths = {900: root / "coco" / "images" / "000000000900.jpg"}
    for image_id, name in ((901, "rotated.jpg"), (902, "grey16.png"), (903, "rgb16.png")):
        paths[image_id] = originals / name
        paths[image_id].write_bytes(files[image_id])
    return run_dir, paths, deep


def test_exif_rotated_and_16_bit_files_embed_as_eval_saw_them(awkward):
    run_dir, paths, deep = awkward
    assert api_module.read_image(paths[901]).shape == (3, 44, 30)  # upright, as the shards packed it
    # 0..65535 read as 0..255 by the shards' rule, not as 256 times too bright
    assert torch.equal(api_module.read_image(paths[902])[0], torch.from_numpy(np.rint(deep[..., 1] / 257)).byte())
    ids, saved, _ = load_image_embeddings(run_dir / "embeddings-val.parquet")
    model = load(run_dir, device="cpu")
    got = model.encode_images(list(paths.values()))  # 8- and 16-bit files in one batch
    # Not the plain JPEG's 0.9999: eval saw the three others after the shards' JPEG re-encoding at quality 95, which
    # moves them by 1 - cosine <= 6e-5 here; read as before (not upright, 16-bit as 8-bit) they were 0.91 to 0.94.
    assert cosine(got, saved[[ids.tolist().index(i) for i in paths]]).min() >= 0.999
    pils = []
    for path in paths.values():
        with Image.open(path) as image:
            pils.append(image.copy())
    torch.testing.assert_close(model.encode_images(pils[1:]), got[1:])  # a PIL image is read by the same rule


def test_text_embedding_is_the_cached_vector_through_the_text_head(run):
    run_dir, _, text, _ = run
    cache = TextCache.load(text)
    model = load(run_dir, device="cpu")
    rows = [0, 7, 12, len(cache) - 1]
    captions = [cache.captions()[r] for r in rows]
    with torch.inference_mode():
        want = model.module.encode_text(cache.embeddings[rows]).float()
    got = model.encode_texts(captions)
    assert got.shape == (4, model.embed_dim) and cosine(got, want).min() >= 0.9999
    # ... which is also what `clipcoco eval` saved for those captions
    table = pq.read_table(run_dir / "embeddings-val.parquet")
    texts = table.filter(pc.equal(table.column("kind"), "text"))
    saved = torch.tensor(np.stack(texts.column("embedding").to_pylist())[rows], dtype=torch.float32)
    assert cosine(got, saved).min() >= 0.9999


def test_paths_pil_images_and_tensors_embed_alike(run):
    run_dir, _, _, files = run
    model = load(run_dir / "checkpoints", device="cpu", batch_size=2)
    paths = [files[i] for i in (700, 701, 702, 703)]
    want = model.encode_images(paths)
    tensors = [decode_jpeg(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)) for p in paths]
    torch.testing.assert_close(model.encode_images([str(p) for p in paths]), want)
    torch.testing.assert_close(model.encode_images(tensors), want)
    torch.testing.assert_close(model.encode_images([t.contiguous() for t in tensors]), want)  # CHW memory too
    torch.testing.assert_close(model.encode_images(tensors[0]), want[:1])  # one image, not in a list
    same_size = torch.stack([tensors[0], tensors[3]])  # images 0 and 3 are both 40 x 30: an [N, 3, H, W] batch
    torch.testing.assert_close(model.encode_images([same_size, tensors[1]]), want[[0, 3, 1]])
    torch.testing.assert_close(model.encode_images(paths, batch_size=3), want, atol=1e-5, rtol=1e-5)
    pils = []
    for p in paths:
        with Image.open(p) as image:
            pils.append(image.copy())
    assert cosine(model.encode_images(pils), want).min() >= 0.9999  # PIL's JPEG decoder, not torchvision's
    grey = Image.fromarray(np.asarray(pils[0].convert("L")))  # greyscale and PNG files are read as RGB
    grey.save(files[700].with_suffix(".png"))
    torch.testing.assert_close(model.encode_images(files[700].with_suffix(".png")), model.encode_images(grey))
    assert model.encode_images([]).shape == (0, model.embed_dim)


def test_text_encoder_loads_on_first_encode_texts_only_and_is_kept(run, monkeypatch):
    run_dir, _, _, files = run
    loads = []
    real = api_module.query_encoder
    monkeypatch.setattr(api_module, "query_encoder", lambda *a, **k: loads.append(1) or real(*a, **k))
    model = load(run_dir, device="cpu")
    model.encode_images([files[700]])
    assert loads == []
    one = model.encode_texts("image 700 caption 0")
    both = model.encode_texts(["image 700 caption 0", "image 701 caption 2"], batch_size=1)
    assert loads == [1] and one.shape == (1, model.embed_dim)
    assert cosine(one[0], both[0]) >= 0.9999
    assert model.encode_texts([]).shape == (0, model.embed_dim)
    assert model.logit_scale == pytest.approx(float(model.module.logit_scale().detach()))
    assert isinstance(model, CLIPModel) and "step 7" in repr(model)


def test_mistakes_are_user_errors(run, tmp_path):
    run_dir, _, _, files = run
    with pytest.raises(UserError, match="no checkpoint in"):
        load(tmp_path, device="cpu")
    with pytest.raises(UserError, match="--device"):
        load(run_dir, device="gpu")
    with pytest.raises(UserError, match="batch size"):
        load(run_dir, device="cpu", batch_size=0)
    model = load(run_dir, device="cpu")
    with pytest.raises(UserError, match="uint8"):
        model.encode_images(torch.rand(3, 8, 8))
    with pytest.raises(UserError, match="uint8"):
        model.encode_images(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(UserError, match="cannot embed a int"):
        model.encode_images([3])
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(UserError, match="notes.jpg is not an image"):
        model.encode_images([files[700], tmp_path / "notes.jpg"])
    with pytest.raises(UserError, match="cannot read image"):
        model.encode_images(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="strings"):
        model.encode_texts([1, 2])


def test_a_missing_text_encoder_is_a_user_error(tmp_path):
    make_run(tmp_path / "run", fingerprint={"model": str(tmp_path / "gone-bert"), "weights_sha256": "w" * 64,
                                            "tokenizer_sha256": "t" * 64, "pooling": "mean", "max_length": 77,
                                            "normalization": "none", "dim": TEXT_DIM})
    model = load(tmp_path / "run", device="cpu")
    assert model.encode_images(torch.zeros(2, 3, 20, 24, dtype=torch.uint8)).shape == (2, model.embed_dim)
    with pytest.raises(UserError, match="gone-bert"):
        model.encode_texts(["a dog"])


def test_importing_clip_and_cli_help_do_not_import_torch():
    code = ("import sys, clip; assert 'torch' not in sys.modules, 'import clip'; sys.argv = ['clipcoco', '--help']\n"
            "from cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'clipcoco --help'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "zeroshot" in proc.stdout
