"""The files a training run reads, opened and cross-checked before any work starts: the training shards and their
text cache, the eval split and its cache, and the image-feature cache of a locked trunk (`open_inputs` → `Inputs`)."""

from dataclasses import dataclass
from pathlib import Path

from clip.config import Config
from clip.image_features import ImageFeatures
from pipeline.errors import UserError
from pipeline.shard_reader import ShardSet, open_shards
from pipeline.text_cache import TextCache


@dataclass(frozen=True)
class Inputs:
    shards: ShardSet
    text: TextCache
    eval_shards: ShardSet | None
    eval_text: TextCache | None
    image_features: ImageFeatures | None = None


def open_inputs(cfg: Config, origins: dict[str, str] | None = None) -> Inputs:
    """Open and cross-check the shards and text caches before any work starts. A path that does not open is named
    with where it came from (`origins`: the flag, --set or the --config file), where that is known."""
    missing = [what for key, what in (("shards", "--shards DIR (from `clipcoco shards`)"),
                                      ("text", "--text FILE (from `clipcoco embed-text`)"))
               if not getattr(cfg.data, key)]
    if missing:
        raise UserError(f"no training data: pass {' and '.join(missing)}")

    def opened(opener, key: str):
        path = getattr(cfg.data, key)
        try:
            return opener(Path(path))
        except UserError as err:
            origin = (origins or {}).get(f"data.{key}")
            source = f" came from {origin}" if origin else ""
            raise UserError(f"{err} (data.{key} {path}{source}: pass --{key.replace('_', '-')} to use another)") \
                from None

    shards = opened(open_shards, "shards")
    text = opened(TextCache.load, "text")
    text.check_matches(shards)
    eval_shards = eval_text = None
    if cfg.data.eval_shards:
        eval_shards = opened(open_shards, "eval_shards")
        eval_text = opened(TextCache.load, "eval_text")
        eval_text.check_matches(eval_shards)
        if eval_text.fingerprint != text.fingerprint:
            raise UserError(f"eval text cache {eval_text.path} was made with a different text encoder than "
                            f"{text.path} ({differences(text.fingerprint, eval_text.fingerprint)}): embed the eval "
                            "captions with the same --model and --pooling")
    features = None
    if cfg.data.image_features:
        features = opened(ImageFeatures.load, "image_features")
        features.check(shards, cfg)
    return Inputs(shards, text, eval_shards, eval_text, features)


def differences(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
