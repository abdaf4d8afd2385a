"""The peer of `clipcoco embed-text` in the benchmarks: a plain sentence-transformers script.

Input: a captions.parquet (the shard contract: image_id, caption_id, caption) and a sentence-transformers model.
Output: a Parquet file of the same rows plus `embedding` (fixed_size_list<float16>[D]), what `embed-text` writes.
It does what a user would write without clipcoco: load, `encode` with the library's defaults, save.

    python scripts/bench_st_encode.py data/shards/val/captions.parquet sentence-transformers/all-MiniLM-L6-v2 st.parquet
"""

import argparse

import pyarrow as pa
import pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", help="captions.parquet to embed")
    parser.add_argument("model", help="sentence-transformers model name or folder")
    parser.add_argument("out", help="Parquet file to write")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the library's choice)")
    args = parser.parse_args()

    table = pq.read_table(args.captions).sort_by([("image_id", "ascending"), ("caption_id", "ascending")])
    model = SentenceTransformer(args.model, device=args.device)
    vectors = model.encode(table.column("caption").to_pylist(), show_progress_bar=True).astype("float16")
    values = pa.array(vectors.reshape(-1), type=pa.float16())
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(values, vectors.shape[1]))
    pq.write_table(table, args.out)


if __name__ == "__main__":
    main()
