"""Per-image work of `clipcoco shards`: decode every image completely, keep or re-encode its JPEG bytes.

Input: the path of one image listed in the annotations. Output: a `Prepared` (the JPEG bytes to pack, their size
as DALI decodes them) or a `Rejected` (why the image is left out, for failures.jsonl). Runs in the worker
processes of pipeline/shards.py; nothing here writes a file. The rule of which files are kept as they are
(`kept_as_is`) and the conversion of all others (`upright_8bit`) are also how `clip.api` reads an image file, so
the API and `clipcoco zeroshot` see the pixels `clipcoco eval` sees.
"""

import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
ROTATED = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations other than "as stored" (1)


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes  # what goes into the `jpg` member
    width: int  # of those bytes as decoded
    height: int
    reencoded: bool


@dataclass(frozen=True)
class Rejected:
    reason: str  # a short category: missing | not_a_file | unreadable | empty | undecodable | no_caption | bad_id
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


def _read_regular(path: Path) -> bytes | Rejected:
    """The bytes of `path` when it is a regular file; a FIFO, device or folder is never read (nor waited on)."""
    try:
        # O_NONBLOCK: opening a FIFO that has no writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return Rejected("missing", "listed in the annotations but not on disk")
    except OSError as err:
        return Rejected("unreadable", f"{type(err).__name__}: {err.strerror}")
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            return Rejected("not_a_file", f"{kind}, not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as err:
        return Rejected("unreadable", f"{type(err).__name__}: {err.strerror}")
    finally:
        os.close(fd)


def integer_white(image: Image.Image) -> int:
    """The sample value that means white in an integer image (mode I or I;16) as opened: its sample type's maximum."""
    if image.mode.startswith("I;16"):
        return 65535
    bits = 16  # mode I without a TIFF's word on it: a 16-bit PNG or PGM as older Pillows open them
    if image.format == "TIFF":
        stored = image.tag_v2.get(258, 32)  # BitsPerSample
        bits = stored[0] if isinstance(stored, tuple) else stored
    return 2 ** min(bits, 31) - 1  # mode I holds signed 32-bit samples


def to_8bit(image: Image.Image, white: int) -> Image.Image:
    """An RGB or L image with 8 bits per channel, with the tones of `image` (PIL's convert("RGB") saturates).

    Integer samples (16- and 32-bit) are scaled from 0..`white` (`integer_white` of the file as opened: 0..65535 ->
    0..255; negative samples are black); float samples from [0, 1] when they lie there, else from their own
    [min, max]; transparency (LA, RGBA, P or L with a transparent colour) is laid over white; anything else (CMYK,
    YCbCr, 1, P) is converted by PIL.
    """
    if image.mode in ("RGB", "L") and "transparency" not in image.info:
        return image
    if image.mode in ("F", "I") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        values = np.where(np.isfinite(values), values, 0.0)
        if image.mode == "F":
            low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (values.min(), values.max())
        else:
            low, high = 0.0, float(white)
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def kept_as_is(image: Image.Image, data: bytes) -> bool:
    """Whether the file `data` (opened as `image`) is packed byte for byte: a plain RGB or grayscale JPEG
    (Huffman-coded baseline or progressive) without an EXIF rotation, which every decoder shows alike."""
    upright = image.getexif().get(EXIF_ORIENTATION, 1) not in ROTATED
    return (image.format == "JPEG" and image.mode in ("RGB", "L") and upright
            and jpeg_frame_type(data) in PLAIN_FRAMES)


def upright_8bit(image: Image.Image) -> Image.Image:
    """An RGB or L image of `image` turned upright by its EXIF orientation and brought to 8 bits (`to_8bit`).

    Upright because DALI applies an EXIF orientation and torchvision's decode_jpeg does not: the shards store
    pixels both show alike. The white level is read first: the upright copy forgets the file's TIFF tags.
    """
    white = integer_white(image)
    return to_8bit(ImageOps.exif_transpose(image), white)


def prepare_image(path: Path, *, resize_shorter: int = 0, quality: int = 95) -> Prepared | Rejected:
    """Read and decode one image completely; keep its bytes when DALI can decode them as they are.

    A plain JPEG (`kept_as_is`) is kept byte for byte unless it must be shrunk; anything else PIL can decode (PNG
    named .jpg, 16-bit PNG, TIFF, CMYK, arithmetic-coded, EXIF-rotated, ...) is turned upright, brought to 8 bits
    (`upright_8bit`) and re-encoded as a JPEG at `quality` without EXIF, so every decoder shows the same upright
    pixels.
    """
    data = _read_regular(path)
    if isinstance(data, Rejected):
        return data
    if not data:
        return Rejected("empty", "zero-length file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            plain = kept_as_is(image, data)
            width, height = image.size
            scale = resize_shorter / min(width, height) if resize_shorter else 1.0
            if plain and scale >= 1.0:
                # Kept as it is, so only its validity matters: at 1/8 scale libjpeg still entropy-decodes every
                # byte of the stream (a truncated or corrupt one raises in load) but skips most of the IDCT.
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
                return Prepared(data, width, height, reencoded=False)
            image.load()  # decodes every pixel; a truncated or corrupt stream raises here
            image = upright_8bit(image)  # the re-encoded JPEG carries no EXIF
            if scale < 1.0:
                width, height = image.size
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                image = image.resize(size, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
            return Prepared(out.getvalue(), image.size[0], image.size[1], reencoded=True)
    except Exception as err:  # whatever a corrupt file makes PIL raise, that image is left out
        return Rejected("undecodable", _ADDRESS.sub("<bytes>", f"{type(err).__name__}: {err}"))
