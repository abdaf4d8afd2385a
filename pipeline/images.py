"""Per-image work of `clipcoco shards`: decode every image completely, keep or re-encode its JPEG bytes.

Input: the path of one image listed in the annotations. Output: a `Prepared` (the JPEG bytes to pack, their size
as DALI decodes them) or a `Rejected` (why the image is left out, for failures.jsonl). Runs in the worker
processes of pipeline/shards.py; nothing here writes a file.
"""

import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes  # what goes into the `jpg` member
    width: int  # of those bytes as decoded
    height: int
    reencoded: bool


@dataclass(frozen=True)
class Rejected:
    reason: str  # a short category: missing | unreadable | empty | undecodable | no_caption
    detail: str  # a fixed-format message (no paths, no addresses: it goes into failures.jsonl)


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# Frame types the GPU decoders take (Huffman-coded baseline, extended sequential, progressive); DALI's
# `mixed` decoder would hand the others (arithmetic-coded, lossless, hierarchical) to a CPU fallback mid-step.
PLAIN_FRAMES = (0xC0, 0xC1, 0xC2)
_NOT_FRAMES = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC: markers in the SOFn range that start no frame


def jpeg_frame_type(data: bytes) -> int | None:
    """The second byte of the first SOFn marker (0xC0 baseline, 0xC2 progressive, 0xC9 arithmetic, ...)."""
    i = 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            return marker
        if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
            return None
        i += 2 + int.from_bytes(data[i + 2: i + 4], "big")
    return None


def prepare_image(path: Path, *, resize_shorter: int = 0, quality: int = 95) -> Prepared | Rejected:
    """Read and decode one image completely; keep its bytes when DALI can decode them as they are.

    The width and height returned are those of the image as DALI decodes it (EXIF orientation applied).

    A plain RGB or grayscale JPEG (Huffman-coded baseline or progressive) is kept byte for byte unless it must
    be shrunk; anything else PIL can decode (PNG named .jpg, CMYK, arithmetic-coded, ...) is re-encoded as a
    JPEG at `quality`.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Rejected("missing", "listed in the annotations but not on disk")
    except OSError as err:
        return Rejected("unreadable", f"{type(err).__name__}: {err.strerror}")
    if not data:
        return Rejected("empty", "zero-length file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            plain = image.format == "JPEG" and image.mode in ("RGB", "L") and jpeg_frame_type(data) in PLAIN_FRAMES
            width, height = image.size
            scale = resize_shorter / min(width, height) if resize_shorter else 1.0
            if plain and scale >= 1.0:
                # Kept as it is, so only its validity matters: at 1/8 scale libjpeg still entropy-decodes every
                # byte of the stream (a truncated or corrupt one raises in load) but skips most of the IDCT.
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
                if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # DALI shows these turned by 90 degrees
                    width, height = height, width
                return Prepared(data, width, height, reencoded=False)
            image.load()  # decodes every pixel; a truncated or corrupt stream raises here
            # EXIF is dropped by re-encoding, so apply its orientation now, as DALI would have.
            image = ImageOps.exif_transpose(image)
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            if scale < 1.0:
                width, height = image.size
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                image = image.resize(size, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
            return Prepared(out.getvalue(), image.size[0], image.size[1], reencoded=True)
    except Exception as err:  # whatever a corrupt file makes PIL raise, that image is left out
        return Rejected("undecodable", _ADDRESS.sub("<bytes>", f"{type(err).__name__}: {err}"))
