"""The defaults of the data stages' options: one home for the stage functions (`build_shards`, `embed_text`) and the
command line, which cannot import the stage modules when it starts (they import torch). Training's defaults live in
clip/config.py's `Config`."""

# clipcoco shards
RESIZE_SHORTER = 0  # keep the original JPEG bytes where valid
QUALITY = 95  # JPEG quality when re-encoding
SAMPLES_PER_SHARD = 1000
WORKERS = 0  # 0 = all cores
MAX_FAILURE_RATE = 0.01

# clipcoco embed-text
TEXT_MODEL = "distilbert-base-uncased"
POOLING = "mean"
MAX_LENGTH = 77  # tokens per caption, CLIP's context length
