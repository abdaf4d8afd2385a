"""Inputs for the benchmarks and the GPU check: generated COCO-size data, repeated COCO, a random text model.

Outputs: a folder in the official COCO 2017 layout (`val2017/*.jpg`, `annotations/captions_val2017.json`), a
captions.parquet per the shard contract, or a Hugging Face model folder that loads offline.
Commands: `clipcoco bench data DIR` and `clipcoco bench text-model DIR` (cli/bench.py); `make bench`
(scripts/bench.py) calls `repeated_coco` to grow coco-mini to a size where start-up no longer dominates.

    make_coco(Path("gen"), n_images=2048)                  # ~155 KB JPEGs at 640x480, 5 captions each
    make_text_model(Path("distilbert-sized"))              # random weights, DistilBERT's shape and cost

Images are smooth random fields with shapes and mild grain at COCO size, so their JPEG size and decode cost
are close to COCO's (~155 KB on average), unlike pure noise (far larger) or flat colour (far smaller).
"""

import json
import os
import shutil
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DISTILBERT_VOCAB = 30522  # the embedding table of distilbert-base-uncased, so the model's size is DistilBERT's
REPEAT_OFFSET = 10**9  # copy k of an image gets id + k * REPEAT_OFFSET: above every COCO id

_WORD_LIST = """a an the two three several man woman person people child boy girl player dog dogs cat cats horse
horses cow sheep elephant giraffe zebra bird bear bus train truck car motorcycle bicycle plane boat kite
skateboard surfboard frisbee ball bat umbrella bench table chair couch bed toilet sink kitchen pizza sandwich
cake banana apple orange broccoli donut plate bowl cup laptop phone clock vase book street road field beach
water snow grass sky building city room wall window tree park sidewalk ocean river hill is are sitting
standing riding walking holding eating playing flying looking laying parked on in at with next to near of
under over top front behind while and for its their large small big little white black red blue green yellow
brown young old tall open wooden colorful empty busy"""
WORDS = _WORD_LIST.split()


def captions(rng: np.random.Generator, n: int) -> list[str]:
    """`n` COCO-like captions (8-15 words, sentence case, a full stop) from WORDS."""
    lengths = rng.integers(8, 16, size=n)
    picks = rng.integers(0, len(WORDS), size=(n, 15))
    out = []
    for row, length in zip(picks, lengths, strict=True):
        text = " ".join(WORDS[i] for i in row[:length])
        out.append(text[0].upper() + text[1:] + ".")
    return out


def _picture(task: tuple[int, int, int, int, str]) -> None:
    from PIL import Image, ImageDraw

    seed, index, width, height, path = task
    rng = np.random.default_rng([seed, index])
    field = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(4, 10))):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(20, width // 2), rng.integers(20, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-16, 17, size=(height, width, 3), dtype=np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=95)


def make_coco(root: Path, *, n_images: int, captions_per_image: int = 5, width: int = 640, height: int = 480,
              seed: int = 0, workers: int = 0) -> dict:
    """`root/val2017/*.jpg` and `root/annotations/captions_val2017.json` (the official layout).

    The layout coco-mini has, so the GPU tests can run on it too (CLIPCOCO_COCO_MINI). `workers` 0 = all cores.
    """
    if n_images < 1 or captions_per_image < 1 or min(width, height) < 16:
        raise UserError("--images and --captions-per-image must be >= 1, --width and --height >= 16")
    images_dir, ann_dir = Path(root) / "val2017", Path(root) / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(seed, i, width, height, str(images_dir / f"{i + 1:012d}.jpg")) for i in range(n_images)]
    with Pool(workers or len(os.sched_getaffinity(0))) as pool:
        pool.map(_picture, tasks, chunksize=8)
    texts = captions(np.random.default_rng(seed), captions_per_image * n_images)
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": width, "height": height}
              for i in range(n_images)]
    annotations = [{"id": k + 1, "image_id": k // captions_per_image + 1, "caption": t} for k, t in enumerate(texts)]
    annotations_file = ann_dir / "captions_val2017.json"
    annotations_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images,
                                            "annotations": annotations}))
    sizes = [os.path.getsize(t[4]) for t in tasks]
    return {"annotations": str(annotations_file), "images": str(images_dir), "n_images": n_images,
            "n_captions": len(texts), "mean_jpeg_kb": round(float(np.mean(sizes)) / 1024, 1)}


def make_captions(shards_dir: Path, *, n_captions: int, seed: int = 0) -> Path:
    """A shard directory holding only a generated captions.parquet (image_id, caption_id, caption), 5 per image:
    enough for `embed-text`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    Path(shards_dir).mkdir(parents=True, exist_ok=True)
    ids = np.arange(n_captions, dtype=np.int64)
    path = Path(shards_dir) / "captions.parquet"
    pq.write_table(pa.table({"image_id": pa.array(ids // 5 + 1), "caption_id": pa.array(ids + 1),
                             "caption": pa.array(captions(np.random.default_rng(seed), n_captions), pa.string())}),
                   path)
    return path


def _word_tokenizer():
    """A BERT-style WordPiece tokenizer that knows every word of WORDS, padded to DistilBERT's vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIAL_TOKENS + sorted(set(WORDS)) + ["."]
    vocab += [f"filler{i}" for i in range(DISTILBERT_VOCAB - len(vocab))]  # never in a caption; sizes the table
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def make_text_model(folder: Path, *, dim: int = 768, layers: int = 6, tokenizer: Path | None = None,
                    seed: int = 0) -> dict:
    """A randomly initialised DistilBERT (`layers` x `dim`; the defaults are DistilBertConfig()'s, the shape and
    cost of distilbert-base-uncased, which may not be downloadable) saved with save_pretrained, so it loads
    offline through AutoModel/AutoTokenizer. Its tokenizer: the one of the `tokenizer` model folder (real text
    tokenizes as with a real model), or a word-level one that knows every word `captions` uses."""
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    if dim < 64 or dim % 64 or layers < 1:
        raise UserError(f"--dim must be a multiple of 64 (got {dim}) and --layers >= 1 (got {layers})")
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer is not None else _word_tokenizer()
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=max(len(tok), DISTILBERT_VOCAB), dim=dim, n_layers=layers,
                              n_heads=dim // 64, hidden_dim=4 * dim, max_position_embeddings=512)
    model = DistilBertModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"model": str(folder), "dim": dim, "layers": layers,
            "parameters": sum(p.numel() for p in model.parameters())}


def repeated_coco(sources: list[tuple[Path, Path]], out: Path, repeats: int) -> tuple[Path, Path]:
    """The images of several official COCO captions files (annotations, images folder), copied `repeats` times
    under new ids (id + k * 10^9), with one official-layout JSON. Returns (annotations file, images folder).

    Copies, not links, so `tar -cf` archives the same bytes that `clipcoco shards` reads.
    """
    images, annotations, where = [], [], {}
    for ann_file, image_dir in sources:
        data = json.loads(Path(ann_file).read_text())
        images += data["images"]
        annotations += data["annotations"]
        where.update({im["id"]: Path(image_dir) / im["file_name"] for im in data["images"]})
    image_dir = Path(out) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    new_images, new_annotations = [], []
    for k in range(repeats):
        offset = k * REPEAT_OFFSET
        for im in images:
            name = f"{im['id'] + offset:012d}.jpg"
            shutil.copyfile(where[im["id"]], image_dir / name)
            new_images.append({**im, "id": im["id"] + offset, "file_name": name})
        new_annotations += [{**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset} for a in annotations]
    ann_file = Path(out) / "captions.json"
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": new_images,
                                    "annotations": new_annotations}))
    return ann_file, image_dir
