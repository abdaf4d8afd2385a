"""clipcoco model side: config, model, loss, training loop, evaluation."""

# OpenAI's CLIP installs a top-level package named `clip` too: cli/__init__.py refuses to run when `import clip`
# finds a package without this name (another `clip` earlier on sys.path, or one installed over ours).
DISTRIBUTION = "clipcoco"
