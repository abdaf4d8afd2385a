"""`clipcoco shards`: round trip, determinism, bad inputs, crash safety, --verify, the read side."""

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq

from pipeline.shards import build_shards, open_shards


def _build(ann, images, out, **kw):
    return build_shards(out=out, images=images, annotations=ann, progress=False, workers=1, **kw)


def test_round_trip_tiny(tiny_coco, tmp_path):
    ann, images = tiny_coco
    manifest = _build(ann, images, tmp_path / "s", samples_per_shard=5)
    shards = open_shards(tmp_path / "s")
    assert [t.name for t in shards.tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert shards.n_images == 12 and manifest["totals"]["captions_packed"] == 60
    np.testing.assert_array_equal(shards.image_ids(), np.arange(1, 13))
    coco = json.loads(ann.read_text())
    expected = {}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        expected.setdefault(a["image_id"], []).append(a["caption"])
    seen = []
    for tar in shards.tars:
        with tarfile.open(tar) as tf:
            names = tf.getnames()
            for info in tf:
                assert info.mtime == 0 and info.uid == 0 and info.gid == 0
            for key in dict.fromkeys(n.split(".")[0] for n in names):
                assert [n for n in names if n.startswith(key)] == [f"{key}.{e}" for e in ("id", "jpg", "json", "txt")]
                image_id = int(np.frombuffer(tf.extractfile(f"{key}.id").read(), "<i8")[0])
                meta = json.loads(tf.extractfile(f"{key}.json").read())
                assert image_id == int(key) == meta["image_id"]
                assert meta["captions"] == expected[image_id]
                assert tf.extractfile(f"{key}.txt").read().decode() == expected[image_id][0]
                assert tf.extractfile(f"{key}.jpg").read() == (images / meta["file_name"]).read_bytes()
                seen.append(image_id)
    assert seen == list(range(1, 13))
    table = pq.read_table(tmp_path / "s" / "captions.parquet")
    assert table.column_names == ["image_id", "caption_id", "caption"] and table.num_rows == 60
