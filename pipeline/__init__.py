"""clipcoco data stages: COCO reading, shard writing, text embedding, loaders.

Importing this package has no side effects; each stage is a module with a plain function that
the `clipcoco` command-line tool (package `cli`) wraps.
"""

__version__ = "0.2.0"
