"""The read side of the shards (pipeline/shard_reader.py): the .idx-located reader against webdataset's own."""

import json
import pickle
from pathlib import Path

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


def _copy(shards, tmp_path):
    import shutil

    return Path(shutil.copytree(shards.root, tmp_path / "copy"))


@pytest.mark.parametrize("content", [lambda text: text[: len(text) // 2], lambda text: "", lambda text: "\0" * 64],
                         ids=["cut short", "empty", "zeroed"])
def test_a_damaged_manifest_is_named_with_what_to_do(shards, tmp_path, content):
    root = _copy(shards, tmp_path)
    (root / "manifest.json").write_text(content((root / "manifest.json").read_text()))
    with pytest.raises(UserError, match=rf"^{root}/manifest.json is damaged \(JSONDecodeError: .*\): rerun the "
                                        rf"`clipcoco shards` command that wrote {root} .*`clipcoco shards --verify "
                                        rf"{root}`$"):
        open_shards(root)


@pytest.mark.parametrize("edit", [lambda line: line.replace(" 12 ", " 1z ", 1), lambda line: line.rsplit(" ", 1)[0]],
                         ids=["not a number", "a field lost"])
def test_a_damaged_index_line_is_named(shards, tmp_path, edit):
    root = _copy(shards, tmp_path)
    idx = root / "shard-000001.idx"
    lines = idx.read_text().splitlines()
    lines[2] = edit(lines[2])
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^{idx} is damaged \(line 3: .*\): check the folder with `clipcoco shards "
                                        rf"--verify {root}` and rebuild it with `clipcoco shards ... --overwrite`$"):
        SampleIndex.load(open_shards(root).indexes)


def test_the_layout_check_finds_a_size_or_offset_the_index_got_wrong(shards):
    """Every member of a tar `clipcoco shards` wrote lies back to back after its own header, so a size or offset that
    changed by a block or more is found from the .idx alone."""
    with SampleIndex.load(shards.indexes) as index:
        index.check_layout()
        # (member changed, which field, by how much, the member named: a wrong offset shows as the one before it)
        for ext, row, column, delta, named in [("jpg", 4, 1, -1000, ("jpg", 4)), ("txt", 6, 1, 1024, ("txt", 6)),
                                               ("json", 0, 0, 512, ("jpg", 0)), ("id", 3, 0, -512, ("id", 3))]:
            members = {e: m.copy() for e, m in index.members.items()}
            members[ext][row, column] += delta
            wrong = SampleIndex(index.tars, index.keys, index.tar_of, members, indexes=index.indexes)
            with pytest.raises(UserError, match=rf"shard-00000\d.idx does not match its tar at sample "
                                                rf"{index.keys[named[1]]}'s {named[0]} member \("):
                wrong.check_layout()
