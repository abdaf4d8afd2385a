"""`clip.load`: the API embeds an eval image as `clipcoco eval` did and a caption as its cached vector through the
text head; paths, PIL images and uint8 tensors embed alike; the frozen text encoder loads only for texts."""

import subprocess
import sys
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
