"""Reading photos safely and turning them into model input.

Every failure becomes an :class:`InputError` naming the file and the cause, so batch jobs can
skip the file and report it.
"""

from __future__ import annotations

import io
import math
import mimetypes
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Images we do not read (animations, HEIF, camera raw...): listed as skipped rather than ignored.
OTHER_IMAGE_EXTENSIONS = frozenset(
    {".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".ico", ".psd", ".dng", ".cr2", ".cr3", ".nef", ".arw"}
    | {".raf", ".orf", ".rw2"}
)
# Refuse decompression bombs before decoding; a 120 MP photo is far beyond what we resize to.
# The cap is checked per call (``max_pixels``) from the header; Pillow's process-wide
# ``Image.MAX_IMAGE_PIXELS`` is left as the application set it (library code must not change
# it). Pillow's own guard may refuse first (above twice its limit, ~179 MP by default): that
# becomes the same one-line error.
MAX_PIXELS = 120_000_000
DRAFT_MIN_PIXELS = 16_000_000  # ``load_image(max_side=...)`` decodes JPEGs above this at a reduced scale


class ImageTooLarge(InputError):
    """An image with more pixels than the caller accepts (refused before decoding)."""


def quiet_bomb_warning() -> None:
    """Silence Pillow's ``DecompressionBombWarning`` in this process; for applications only (each
    process that reads photos: the CLI, each server worker), once, before any thread starts.

    Pillow warns about images above its limit (~89 MP) that ``load_image`` refuses above its own
    cap anyway, with a one-line error; below our cap the warning is noise on stderr. The filter is
    process-wide and not inherited by spawned processes, hence one call per process.
    """
    import warnings

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def load_image(
    path: str | Path | bytes,
    exif_transpose: bool = True,
    *,
    max_side: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Open ``path`` as an RGB image, EXIF orientation applied (unless told not to).
    ``path`` may also be a file's bytes (an upload, decoded without a temporary file), which
    errors call ``name``.

    Grayscale, CMYK, palette and alpha images are converted to RGB (alpha composited on white).
    Raises :class:`InputError` for missing, empty, truncated or non-image files, and
    :class:`ImageTooLarge` (read from the header, before decoding) above ``max_pixels`` (None:
    no cap of ours).
    ``max_side``: the caller will shrink the image to about this longest side anyway, so a JPEG
    of more than ``DRAFT_MIN_PIXELS`` is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose
    longest side is still >= ``max_side`` (less time and memory; other formats decode in full).
    Smaller images decode exactly as without it (DCT scaling shifts descriptors slightly). The
    result is not resized to ``max_side``: that stays the caller's resize.
    """
    source: Path | io.BytesIO
    label: str | Path
    if isinstance(path, bytes):
        source, size, label = io.BytesIO(path), len(path), name or "<upload>"
    else:
        source = label = Path(path)
        try:
            size = source.stat().st_size
        except OSError as err:
            raise InputError(label, f"cannot read file ({err.strerror or err})") from None
    if size == 0:
        raise InputError(label, "empty file")
    try:
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLarge(
                    label,
                    f"image too large ({img.width}x{img.height} = "
                    f"{img.width * img.height / 1e6:.1f} MP; the limit is {max_pixels / 1e6:g} MP)",
                )
            if (
                max_side
                and img.format == "JPEG"
                and img.width * img.height > DRAFT_MIN_PIXELS
                and max(img.size) >= 2 * max_side
            ):
                scale = max_side / max(img.size)
                img.draft(None, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            img.load()
            img = _to_rgb(ImageOps.exif_transpose(img) if exif_transpose else img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning under -W error
        raise ImageTooLarge(label, f"image too large ({str(err).split(',')[0]})") from None
    except UnidentifiedImageError:
        raise InputError(label, "not an image (unrecognised format)") from None
    except OSError as err:
        raise InputError(label, f"corrupt or truncated image ({err})") from None
    except (ValueError, SyntaxError) as err:  # some malformed headers surface as these
        raise InputError(label, f"corrupt image ({err})") from None
    if img.width < 8 or img.height < 8:
        raise InputError(label, f"image too small ({img.width}x{img.height})")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        arr = (255 * (arr - arr.min()) / max(float(np.ptp(arr)), 1.0)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")  # L, CMYK, P, YCbCr, ...


def target_size(width: int, height: int, max_side: int | None = 640, multiple: int = 32) -> tuple[int, int]:
    """(H, W) keeping the aspect ratio, longest side ~``max_side``, both multiples of ``multiple``."""
    if max_side is None:
        scale = 1.0
    else:
        scale = max_side / max(width, height)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def to_tensor(img: Image.Image, size: tuple[int, int] | None = None, max_side: int | None = 640) -> torch.Tensor:
    """RGB float tensor (3, H, W) in [0, 1]; resized to ``size`` (H, W) or by ``max_side``."""
    h, w = size if size is not None else target_size(img.width, img.height, max_side)
    if (img.height, img.width) != (h, w):
        img = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def natural_key(s: str) -> list:
    """Sort key: digit runs compare as numbers, the rest case-insensitively ("img2" < "img10")."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def image_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """The image files under ``folder`` (by extension, ``IMAGE_EXTENSIONS``; hidden names skipped),
    in natural order (``natural_key``) of their path relative to ``folder``: the one ordering of
    a folder's images, for dataset readers, extraction and indexing alike."""
    folder = Path(folder)
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = [p for p in it if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def unsupported_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Files under ``folder`` that are images of a type hafloc does not read (by extension:
    ``OTHER_IMAGE_EXTENSIONS`` or an ``image/`` MIME type outside ``IMAGE_EXTENSIONS``), hidden
    names skipped, in ``image_files`` order: what a folder's listing leaves out, for reporting."""
    folder = Path(folder)
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p
        for p in it
        if p.suffix.lower() not in IMAGE_EXTENSIONS
        and (p.suffix.lower() in OTHER_IMAGE_EXTENSIONS or (mimetypes.guess_type(p.name)[0] or "").startswith("image/"))
        and not p.name.startswith(".")
        and p.is_file()
    ]
    return sorted(files, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def list_images(paths: list[str | Path], recursive: bool = True) -> list[tuple[Path, Path]]:
    """Expand files and folders into ``(file, root)`` pairs, root = the folder given.

    Each folder's images come in ``image_files`` order; the inputs keep the order given. Names
    reported to users are ``file`` relative to ``root`` (keeps sub-folders). A file given
    directly has its own parent as root. Non-image files inside folders are ignored; a file
    given explicitly is kept whatever its extension (it will fail to load with a clear reason).
    """
    out: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend((f, p) for f in image_files(p, recursive))
        elif p.exists():
            out.append((p, p.parent))
        else:
            raise InputError(p, "no such file or folder")
    return out
