"""`clipcoco export`: a run's checkpoint as an open_clip model folder, for open_clip, CLIP_benchmark and the Hub.

Input: a run directory (its `latest`, or `--step N`) or one checkpoint file, and the frozen text model its text cache
was made with (found where the checkpoint says, checked against the cache's sha256s).
Output: `--out DIR`, written whole under a temporary name and renamed, so it appears complete or not at all:
- `open_clip_config.json`: `model_cfg` (a timm ResNet image tower, a Hugging Face text tower) and `preprocess_cfg`;
- `open_clip_model.safetensors`: every weight: the trunk (torchvision's keys are timm's), both heads, the frozen
  text tower, the logit scale (and bias for a sigmoid run);
- the text tower's `config.json` and the tokenizer's files, so the folder needs neither clipcoco nor the original
  text model folder; `README.md`, a model card in the Hub's format.
Command: `clipcoco export RUN [--step N] --out DIR [--hub-id NAME]`; load with
`open_clip.create_model_and_transforms("local-dir:DIR")` and `open_clip.get_tokenizer("local-dir:DIR")`.

The text tower: open_clip 3.3's Hugging Face wrapper knows BERT but not DistilBERT, and DistilBERT is a BERT with
6 layers and no token-type embedding, so its weights are renamed into a `BertModel` whose token-type embeddings are
zeros: the same function, checked on a probe batch before anything is written. open_clip builds the text tower from
`text_cfg.hf_model_name` with `AutoConfig.from_pretrained` (the weights come from the safetensors file), so that
name must find this folder's `config.json`: the folder's absolute path as written, or `--hub-id NAME` for a folder
meant to be uploaded to the Hub as NAME.
"""

import errno
import json
import math
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from clip.checkpoint import CHECKPOINT_DIR, Checkpoint, checkpoint_name, resolve_checkpoint, run_dir_of
from clip.model import head_form
from pipeline import __version__
from pipeline.embed_text import query_encoder
from pipeline.errors import UserError
from pipeline.files import commit, sha256_file

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# clipcoco's pooling -> open_clip's pooler. Not `cls_pooler`: on a BERT it returns the pooler layer's output
# (dense + tanh), not the [CLS] hidden state embed-text pooled.
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
TEXT_TYPES = ("bert", "distilbert")  # text towers this export writes as a BertModel, which open_clip loads
_PROBE = ["a photo of a dog on a beach", "two cats"]


def export(run: Path, *, out: Path, step: int | None = None, hub_id: str | None = None) -> Path:
    """Write the open_clip folder of a run's checkpoint to `out` (see the module docstring) and return it."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder: pass a new folder")
    path = _checkpoint_path(Path(run), step)
    ckpt = Checkpoint.load(path)
    if head_form(ckpt.model) != "open_clip":
        raise UserError(f"{path} has the projection heads of an older clipcoco (a text head with a bias, or MLP "
                        "heads of other hidden widths), which open_clip cannot express: train the run again with this "
                        "version to export it")
    bert, tokenizer = _text_tower(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write(tmp, path, ckpt, bert, tokenizer, name=hub_id or str(out.resolve()), out=out, hub_id=hub_id)
        # The folder's entries reach the disk, then the rename (which replaces an empty folder) and its parent's entry.
        commit(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UserError(f"--out {out} was filled while the export ran: pass a new folder") from None
        raise
    return out


def _checkpoint_path(run: Path, step: int | None) -> Path:
    if step is None:
        return resolve_checkpoint(run)
    if run.is_file():
        raise UserError(f"--step goes with a run directory, and {run} is a file: pass the run directory, or the file "
                        "without --step")
    folder = run if run.name == CHECKPOINT_DIR else run / CHECKPOINT_DIR
    path = folder / checkpoint_name(step)
    if not path.is_file():
        kept = sorted(p.name for p in folder.glob("step_*.pt"))
        raise UserError(f"no checkpoint of step {step} in {folder} (it keeps {', '.join(kept) or 'none'}): pass one "
                        "of those steps, or no --step for the latest")
    return path


# ---------------------------------------------------------------------------------------------
# The text tower as a BertModel


def _text_tower(ckpt: Checkpoint):
    """(BertModel without its pooler layer, fast tokenizer): the run's frozen text model, in open_clip's terms."""
    from transformers import BertConfig, BertModel

    fingerprint = dict(ckpt.text_fingerprint)
    location = ckpt.text_model_path or fingerprint["model"]  # an older checkpoint: where the fingerprint's name says
    if ckpt.text_model_path and not Path(location).is_dir():
        raise UserError(f"the run's text model folder {location} is gone: export copies the text tower's weights and "
                        f"tokenizer from it, so restore it there ({fingerprint['model']}, the model embed-text used)")
    encoder = query_encoder(fingerprint, device="cpu", location=location)
    source, kind = encoder.model, encoder.model.config.model_type
    if kind not in TEXT_TYPES:
        raise UserError(f"the run's text model {fingerprint['model']} is a {kind}: export writes BERT and DistilBERT "
                        "text towers only (open_clip's Hugging Face wrapper has no other encoder of that family)")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("pooler.")}
    if kind == "distilbert":
        config, state = _distilbert_as_bert(source.config, state)
    else:
        config = BertConfig.from_dict(source.config.to_dict())
    config.pad_token_id = encoder.tokenizer.pad_token_id  # open_clip's attention mask is `ids != pad_token_id`
    config.architectures = ["BertModel"]
    bert = BertModel(config, add_pooling_layer=False).eval()
    bert.load_state_dict(state, strict=True)
    _check_same_function(source, bert, encoder.tokenizer)
    return bert, encoder.tokenizer


def _distilbert_as_bert(config, state: dict):
    """A DistilBERT's config and weights renamed into BERT's: the same layers, token-type embeddings of zero (two
    rows, BERT's usual, so a caller passing token types 0/1 still gets DistilBERT's output)."""
    from transformers import BertConfig

    bert_config = BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, intermediate_size=config.hidden_dim, hidden_act=config.activation,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=2, layer_norm_eps=1e-12,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attention_dropout)
    renames = {"attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
               "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
               "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense",
               "ffn.lin2": "output.dense", "output_layer_norm": "output.LayerNorm"}
    converted = {}
    for key, value in state.items():
        if key.startswith("transformer.layer."):
            key = "encoder.layer." + key.removeprefix("transformer.layer.")
            for old, new in renames.items():
                key = key.replace(f".{old}.", f".{new}.")
        converted[key] = value
    word = state["embeddings.word_embeddings.weight"]
    converted["embeddings.token_type_embeddings.weight"] = torch.zeros(2, word.shape[1], dtype=word.dtype)
    return bert_config, converted


@torch.inference_mode()
def _check_same_function(source, bert, tokenizer) -> None:
    batch = tokenizer(_PROBE, padding=True, return_tensors="pt")
    want = source(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    got = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"the text tower as a BertModel differs from {type(source).__name__} by "
                           f"{(want - got).abs().max().item():.2e}: not exported")


# ---------------------------------------------------------------------------------------------
# The folder


def open_clip_config(ckpt: Checkpoint, name: str) -> dict:
    """open_clip_config.json: `name` is what `text_cfg.hf_model_name` resolves to (this folder's config.json)."""
    cfg, fingerprint = ckpt.cfg, ckpt.text_fingerprint
    model_cfg = {
        "embed_dim": cfg.model.embed_dim,
        "vision_cfg": {"image_size": cfg.data.image_size, "timm_model_name": cfg.model.image_model,
                       "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": cfg.model.head,
                       "timm_proj_bias": True},
        "text_cfg": {"hf_model_name": name, "hf_tokenizer_name": name, "hf_model_pretrained": False,
                     "hf_pooler_type": POOLERS[fingerprint["pooling"]], "hf_proj_type": cfg.model.head,
                     "context_length": int(fingerprint["max_length"])},
        "custom_text": True,
    }
    if cfg.model.loss == "sigmoid":
        model_cfg["init_logit_bias"] = cfg.model.init_logit_bias
    # clipcoco's eval transform: the center square resized to its size (antialiased), then normalised; open_clip's
    # `shortest` resizes the shorter side then center-crops: the same square to within resampling.
    transform = cfg.data.transform()
    preprocess_cfg = {"size": transform.size, "mode": "RGB", "mean": list(transform.mean), "std": list(transform.std),
                      "interpolation": transform.interpolation, "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def open_clip_state_dict(ckpt: Checkpoint, bert) -> dict[str, torch.Tensor]:
    """The weights under open_clip's CustomTextCLIP names (timm's ResNet keys are torchvision's)."""
    model = ckpt.model
    state = {f"visual.trunk.{k.removeprefix('trunk.')}": v for k, v in model.items() if k.startswith("trunk.")}
    image_head = {"weight": "proj.weight", "bias": "proj.bias", "0.weight": "mlp.fc1.weight",
                  "0.bias": "mlp.fc1.bias", "2.weight": "mlp.fc2.weight", "2.bias": "mlp.fc2.bias"}
    text_head = {"weight": "weight", "0.weight": "0.weight", "2.weight": "2.weight"}
    for key, value in model.items():
        if key.startswith("image_head."):
            state[f"visual.head.{image_head[key.removeprefix('image_head.')]}"] = value
        elif key.startswith("text_head."):
            state[f"text.proj.{text_head[key.removeprefix('text_head.')]}"] = value
    state.update({f"text.transformer.{k}": v for k, v in bert.state_dict().items()})
    state["logit_scale"] = log_logit_scale(ckpt)
    if "logit_bias" in model:
        state["logit_bias"] = model["logit_bias"]
    return {k: v.detach().float().contiguous().clone() for k, v in state.items()}


def _write(folder: Path, path: Path, ckpt: Checkpoint, bert, tokenizer, *, name: str, out: Path,
           hub_id: str | None) -> None:
    from safetensors.torch import save_file

    config = open_clip_config(ckpt, name)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(open_clip_state_dict(ckpt, bert), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    bert.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # The checkpoint file names its step: no --step (which goes with a run directory only).
    command = shlex.join(["clipcoco", "export", str(path), "--out", str(out),
                          *(["--hub-id", hub_id] if hub_id else [])])
    (folder / "README.md").write_text(model_card(path, ckpt, config, command=command, hub_id=hub_id))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)  # mkdtemp's folder, and safetensors' file, are private to the owner
    for file in folder.iterdir():  # the bytes on disk before the rename makes the folder visible
        file.chmod(0o666 & ~umask)
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def eval_reports(path: Path, ckpt: Checkpoint, sha: str) -> list[dict]:
    """The `clipcoco eval` reports of exactly this checkpoint (its step's files, its sha256 `sha`)."""
    reports = []
    for file in sorted(run_dir_of(path).glob(f"eval-*-step{int(ckpt.step):08d}.json")):
        try:
            report = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get("checkpoint_sha256") == sha:
            reports.append(report)
    return reports


def model_card(path: Path, ckpt: Checkpoint, config: dict, *, command: str, hub_id: str | None) -> str:
    """README.md in the Hub's model-card format: YAML metadata, then what the model is and how to use it."""
    cfg, fingerprint = ckpt.cfg, ckpt.text_fingerprint
    shards = Path(cfg.data.shards).name or "coco"
    header = {"library_name": "open_clip", "license": "mit", "pipeline_tag": "zero-shot-image-classification",
              "tags": ["clip", "open_clip", "clipcoco", "image-text-retrieval", cfg.model.image_model],
              "datasets": [shards]}
    text = config["model_cfg"]["text_cfg"]
    rows = ["| split | images | captions | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | folds |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    sha = sha256_file(path)  # hundreds of MB for a ResNet-50 run: read once
    for r in eval_reports(path, ckpt, sha):
        recalls = " | ".join(f"{100 * r[f'{d}_r{k}']:.2f}" for d in ("i2t", "t2i") for k in (1, 5, 10))
        rows.append(f"| {r['split']} | {r['n_images']:,} | {r['n_captions']:,} | {recalls} | {r['folds']} |")
    evals = "\n".join(rows) if len(rows) > 2 else "No `clipcoco eval` report of this checkpoint was found in its run."
    name = hub_id or "DIR"
    load = f"hf-hub:{hub_id}" if hub_id else "local-dir:DIR"
    moved = ("" if hub_id else
             f"`text_cfg.hf_model_name` in `open_clip_config.json` is this folder's absolute path as written "
             f"(`{text['hf_model_name']}`): open_clip reads the text tower's `config.json` from there. After moving "
             "the folder, set it (and `hf_tokenizer_name`) to the new path, or export again with `--out` at the new "
             "place; for the Hub, export with `--hub-id NAME` and upload that folder to NAME.\n\n")
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# clipcoco CLIP: {cfg.model.image_model} + {fingerprint['model']}

A CLIP trained with clipcoco {__version__} (step {int(ckpt.step):,}) on COCO-layout image-caption shards, exported
for [open_clip](https://github.com/mlfoundations/open_clip) by `clipcoco export`.

## Architecture

- Image tower: timm `{cfg.model.image_model}` (torchvision's ResNet, ImageNet mean/std,
  {cfg.data.image_size} px), global average pooling, projection head `{cfg.model.head}` to
  {cfg.model.embed_dim} dimensions.
- Text tower: `{fingerprint['model']}` (frozen during training; a `BertModel` here),
  {fingerprint['pooling']} pooling over at most {int(fingerprint['max_length'])} tokens, projection head
  `{cfg.model.head}` to {cfg.model.embed_dim} dimensions.
- Loss: {cfg.model.loss}; logit scale {math.exp(float(log_logit_scale(ckpt))):.4g}{
    f", logit bias {float(ckpt.model['logit_bias']):.4g}" if 'logit_bias' in ckpt.model else ''}.

## Training

Shards fingerprint: `{ckpt.shards_fingerprint}`. Text cache fingerprint: weights `{fingerprint['weights_sha256']}`,
tokenizer `{fingerprint['tokenizer_sha256']}`, pooling {fingerprint['pooling']}, max length
{int(fingerprint['max_length'])}, dim {int(fingerprint['dim'])}. Checkpoint sha256: `{sha}`.

Trained with `clipcoco train --config config.yaml`, this resolved config:

```yaml
{yaml.safe_dump(ckpt.config, sort_keys=False).strip()}
```

## Evaluation (`clipcoco eval`, recall in %)

{evals}

## How it was made

```bash
{command}
```

## Use

```python
import open_clip
import torch
from PIL import Image

model, _, preprocess = open_clip.create_model_and_transforms("{load}")
tokenizer = open_clip.get_tokenizer("{load}")
model.eval()
image = preprocess(Image.open("dog.jpg")).unsqueeze(0)
text = tokenizer(["a dog on a couch", "a cat on a bed"])
with torch.no_grad():
    image_features = model.encode_image(image, normalize=True)
    text_features = model.encode_text(text, normalize=True)
    probs = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)
```

{moved}Retrieval with CLIP_benchmark (a COCO-captions folder: `ROOT/val2014/` images and their captions JSON):

```bash
clip_benchmark eval --model {load} --pretrained none --dataset mscoco_captions --dataset_root ROOT \\
    --annotation_file captions.json --task zeroshot_retrieval --recall_k 1 5 10 --no_amp
```

Upload (Hugging Face CLI): `huggingface-cli upload {name if hub_id else 'NAME'} {'.' if hub_id else 'DIR'} .`
"""


def log_logit_scale(ckpt: Checkpoint) -> torch.Tensor:
    """The log of the scale clipcoco uses: it clamps when it uses it, open_clip takes `logit_scale.exp()` as stored."""
    return ckpt.model["log_logit_scale"].clamp(max=math.log(ckpt.cfg.model.max_logit_scale))
