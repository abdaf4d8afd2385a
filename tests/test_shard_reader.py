"""The read side of the shards (pipeline/shard_reader.py): the .idx-located reader against webdataset's own."""

import json
import pickle

import pytest

from pipeline.errors import UserError
from pipeline.shard_reader import MEMBERS, SampleIndex, decode_id, key_of, open_shards
from pipeline.shards import build_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import write_coco

    root = tmp_path_factory.mktemp("reader")
    ann, images = write_coco(root / "coco", 7, first_id=40)
    build_shards(out=root / "s", images=images, annotations=ann, samples_per_shard=3, workers=1, progress=False)
    return open_shards(root / "s")


def test_every_member_as_webdataset_reads_it(shards):
    wds = pytest.importorskip("webdataset")
    expected = list(wds.WebDataset([str(t) for t in shards.tars], shardshuffle=False))
    with SampleIndex.load(shards.indexes) as index:
        assert len(index) == len(expected) == shards.n_images == 7
        assert sorted(index.members) == list(MEMBERS)
        for row, sample in enumerate(expected):
            assert index.keys[row] == sample["__key__"]
            for ext in MEMBERS:
                assert index.read(row, ext) == sample[ext]
            assert index.image_id(row) == decode_id(sample["id"]) == int(sample["__key__"])


def test_samples_by_image_id(shards):
    with SampleIndex.load(shards.indexes) as index:
        sample = index.sample(45)
        assert sample["json"]["image_id"] == 45 and sample["jpg"][:2] == b"\xff\xd8"
        assert index.keys[index.row_of(45)] == key_of(45) == "000000000045"
        with pytest.raises(UserError, match="image id 3 is not in these shards"):
            index.row_of(3)


def test_pickled_index_opens_its_own_files(shards):
    index = SampleIndex.load(shards.indexes)
    first = index.read(4, "json")
    copy = pickle.loads(pickle.dumps(index))
    assert copy._fds == {} and copy.read(4, "json") == first
    index.close()
    copy.close()


def test_a_sample_lacking_a_member_is_refused(shards, tmp_path):
    lines = shards.indexes[0].read_text().splitlines()
    fields = lines[1].split()
    lines[1] = " ".join(f for i, f in enumerate(fields) if not 4 <= i < 8)  # drop the jpg group of sample 0
    (tmp_path / "shard-000000.idx").write_text("\n".join(lines) + "\n")
    index = SampleIndex.load([tmp_path / "shard-000000.idx"], tars=[shards.tars[0]])
    assert json.loads(index.read(1, "json"))["image_id"] == 41
    with pytest.raises(UserError, match="sample 000000000040 .* lacks its jpg member"):
        index.require("jpg", "id")


def test_not_an_index(tmp_path):
    (tmp_path / "x.idx").write_text("garbage\n")
    with pytest.raises(UserError, match="not a DALI webdataset index"):
        SampleIndex.load([tmp_path / "x.idx"])
