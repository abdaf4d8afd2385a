"""clipcoco model side: config, model, loss, training loop, evaluation, and the public API.

    from clip import load                      # see clip/api.py
    model = load("runs/coco-karpathy", device="cpu")

`load` and `CLIPModel` are imported on first use, so `import clip` stays cheap (no torch) and side-effect free.
"""

# OpenAI's CLIP installs a top-level package named `clip` too: cli/__init__.py refuses to run when `import clip`
# finds a package without this name (another `clip` earlier on sys.path, or one installed over ours).
DISTRIBUTION = "clipcoco"

__all__ = ["CLIPModel", "load"]


def __getattr__(name: str):
    if name in __all__:
        from clip import api

        return getattr(api, name)
    raise AttributeError(f"module 'clip' has no attribute {name!r}")
