"""The shards as other tools read them: webdataset's defaults, open_clip's own training loader, its size file;
and the format version every clipcoco reader checks."""

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import UserError
from pipeline.shard_reader import FORMAT_VERSION, decode_ids, encode_id, open_shards
from pipeline.shard_verify import verify_shards
from pipeline.shards import build_shards

REPO = Path(__file__).resolve().parents[1]


def readme_snippet(containing: str) -> str:
    """The README's Python block that contains `containing`: the text the tests run, so the README stays true."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README.md has {len(found)} python blocks with {containing!r}"
    return found[0]


@pytest.fixture(scope="module")
def mini_one_shard(coco_mini, tmp_path_factory):
    """coco-mini val2017 packed into a single shard."""
    out = tmp_path_factory.mktemp("mini1") / "shards"
    build_shards(out=out, images=coco_mini / "val2017", annotations=coco_mini / "annotations" / "captions_val2017.json",
                 progress=False)
    return open_shards(out)


@pytest.mark.parametrize("split", ["mini", "mini_one_shard"])
def test_the_readme_webdataset_snippet_reads_every_sample(split, request):
    pytest.importorskip("webdataset")
    shards = request.getfixturevalue(split)
    code = readme_snippet("import webdataset").replace('"data/shards/val2017"', repr(str(shards.root)))
    scope = {}
    exec(code, scope)
    assert len(shards.tars) == (3 if split == "mini" else 1) and scope["n"] == len(shards.tars)
    read = list(scope["samples"])  # no only=: every member decoded by webdataset's defaults
    assert len(read) == shards.n_images == 79
    assert [s["id"] for s in read] == [s["json"]["image_id"] for s in read] == shards.image_ids().tolist()
    assert all(s["jpg"].mode == "RGB" and s["txt"] == s["json"]["captions"][0] for s in read)
    assert scope["image_id"] == read[-1]["id"] and scope["captions"] == read[-1]["json"]["captions"]


def _first_captions(shards) -> set[str]:
    table = pq.read_table(shards.root / "captions.parquet").to_pydict()
    first = {}
    for image_id, caption in zip(table["image_id"], table["caption"], strict=True):
        first.setdefault(image_id, caption)
    return set(first.values())


def test_open_clip_pipeline_stages_read_every_sample(mini):
    """open_clip's training pipeline after its shard handling (select txt+jpg, decode pilrgb, rename, to_tuple), with
    a handler that raises instead of skipping, as webdataset's own stages."""
    wds = pytest.importorskip("webdataset")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(t) for t in mini.tars]),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.select(lambda s: ("txt" in s) and ("jpg" in s)),
        wds.decode("pilrgb", handler=wds.reraise_exception),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.to_tuple("image", "text"),
    )
    read = list(pipeline)
    assert len(read) == 79 and all(image.mode == "RGB" for image, _ in read)
    assert {text for _, text in read} == _first_captions(mini)


def test_open_clip_own_loader_and_size_file(mini):
    """open_clip_train's get_dataset_size (sizes.json) and get_wds_dataset (its eval path: the train path of
    open_clip 3.3 needs webdataset <= 0.2.86, its known incompatibility with later webdataset, open_clip#935)."""
    pytest.importorskip("open_clip")
    pytest.importorskip("pandas")  # open_clip_train.data imports it
    from argparse import Namespace

    from open_clip_train.data import get_dataset_size, get_wds_dataset

    urls = f"{mini.root}/shard-{{000000..{len(mini.tars) - 1:06d}}}.tar"
    assert get_dataset_size(urls) == (79, len(mini.tars))  # no --train-num-samples needed
    args = Namespace(train_data=None, val_data=urls, val_num_samples=79, batch_size=8, workers=1, world_size=1)
    data = get_wds_dataset(args, lambda image: torch.tensor(image.size), is_train=False,
                           tokenizer=lambda text: [text])
    texts = [t for _, batch in data.dataloader for t in batch]  # log_and_continue would skip what it cannot decode
    assert len(texts) == 79 and set(texts) == _first_captions(mini)


def test_sizes_json_matches_the_manifest(mini):
    sizes = json.loads((mini.root / "sizes.json").read_text())
    assert sizes == {e["tar"]: e["count"] for e in mini.manifest["shards"]}
    assert sum(sizes.values()) == 79 and mini.manifest["format_version"] == FORMAT_VERSION


def test_id_member_round_trip():
    digits = [encode_id(i) for i in (0, 139, 581929, 999_999_999_999)]
    assert digits[1] == b"000000000139" and all(len(d) == 12 for d in digits)
    batch = torch.tensor([list(d) for d in digits], dtype=torch.uint8)  # DALI's [B, 12] uint8 batch
    assert decode_ids(batch).tolist() == [0, 139, 581929, 999_999_999_999]
    for bad in (-1, 10**12):
        with pytest.raises(ValueError, match="12-digit key"):
            encode_id(bad)


def test_old_format_is_refused_everywhere(mini, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(mini.root, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["format_version"]  # what version 1 wrote
    (old / "manifest.json").write_text(json.dumps(manifest))
    for read in (open_shards, lambda d: verify_shards(d, progress=False)):
        with pytest.raises(UserError, match=r"format version 1; this clipcoco reads version 2: rebuild .*--overwrite"):
            read(old)


def test_ids_without_a_key_are_left_out_and_listed(tiny_coco, tmp_path):
    ann, images = tiny_coco
    data = json.loads(ann.read_text())
    data["images"][0]["id"] = -5
    for a in data["annotations"]:
        if a["image_id"] == 1:
            a["image_id"] = -5
    ann.write_text(json.dumps(data))
    manifest = build_shards(out=tmp_path / "s", images=images, annotations=ann, workers=1, progress=False,
                            max_failure_rate=0.5)
    totals = manifest["totals"]
    assert (totals["images_listed"], totals["images_packed"], totals["images_left_out"]) == (12, 11, 1)
    failures = [json.loads(line) for line in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert [(f["image_id"], f["reason"]) for f in failures] == [(-5, "bad_id")]


def test_the_readme_pandas_and_duckdb_snippet_reads_the_parquet_files(mini, tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("duckdb")
    from conftest import write_random_text_cache

    split = tmp_path / "val2017"  # the split's Parquet files, with a random cache under the README's cache name
    split.mkdir()
    shutil.copy(mini.root / "captions.parquet", split)
    write_random_text_cache(mini.root, split / "text-distilbert-base-uncased-mean.parquet", dim=16)
    scope = {}
    exec(readme_snippet("import duckdb").replace("data/shards/val2017", str(split)), scope)
    captions, cache = scope["captions"], scope["cache"]
    assert list(captions.columns) == ["image_id", "caption_id", "caption"] and len(captions) >= 5 * 79
    assert len(scope["counts"].fetchall()) == 79
    assert list(cache.columns) == ["image_id", "caption_id", "caption", "embedding"] and len(cache) == len(captions)
    assert len(cache["embedding"].iloc[0]) == 16
    rows = scope["dims"].fetchall()
    assert len(rows) == 3 and all(dim == 16 for _, dim in rows)
