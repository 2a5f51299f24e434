"""Images for the multimodal pipelines: reading one from a path, and the
built-in validation images, drawn by code (no downloads), so a recipe can
validate with `builtin:NAME` (96 x 96) or `builtin:NAME@WxH` (any size, as
LLaVA-NeXT's tiling depends on the aspect ratio) and a test can write a PNG
of its own."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import BadInput

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

BUILTIN_SIZE = 96


def image_hw(size) -> tuple[int, int]:
    """A visual encoder's input size as (height, width): `size` is an int
    (square) or [height, width] (Nougat's pages)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _draw(name: str, width: int, height: int):
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    if name == "gradient":  # red left to right, green top to bottom, blue a diagonal band
        rgb = np.stack([x, y, 1.0 - np.abs(x - y)], -1)
    elif name == "rings":  # concentric rings around an off-centre point
        r = np.sqrt((x - 0.35) ** 2 + (y - 0.6) ** 2)
        rgb = np.stack([0.5 + 0.5 * np.sin(r * 40), 0.5 + 0.5 * np.cos(r * 25), r / r.max()], -1)
    elif name == "checker":  # an 8 x 8 checkerboard in two colours
        c = ((np.floor(x * 7.999) + np.floor(y * 7.999)) % 2)[..., None]
        rgb = c * np.array([0.9, 0.8, 0.1]) + (1 - c) * np.array([0.1, 0.2, 0.7])
    else:
        raise BadInput(f"no built-in image {name!r}; built-in images: {', '.join('builtin:' + n for n in BUILTIN)}")
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


BUILTIN = ("gradient", "rings", "checker")


def builtin_image(name: str, size: int = BUILTIN_SIZE, height: Optional[int] = None) -> "Image":
    """A drawn image, size x size (or size wide, height high); `name` may
    carry its size as NAME@WxH."""
    from PIL import Image

    if "@" in name:
        name, _, wh = name.partition("@")
        try:
            size, height = (int(v) for v in wh.lower().split("x"))
        except ValueError:
            raise BadInput(f"builtin:{name}@{wh}: give the size as WIDTHxHEIGHT, e.g. @120x80") from None
    height = height or size
    if not (8 <= size <= 4096 and 8 <= height <= 4096):
        raise BadInput(f"built-in image sizes are 8 to 4096 px (got {size} x {height})")
    return Image.fromarray(_draw(name, size, height))


def load_image(spec: str, base: Optional[Path] = None) -> "Image":
    """`builtin:NAME` or a path to an image file (relative paths from base)."""
    if spec.startswith("builtin:"):
        return builtin_image(spec[len("builtin:"):])
    from PIL import Image, UnidentifiedImageError

    p = Path(spec)
    if base is not None and not p.is_absolute():
        p = base / p
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadInput(f"no image file at {spec}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"cannot read image {spec}: {e}") from None


def image_digest(spec: str, base: Optional[Path] = None) -> str:
    """What an image spec stands for, as a digest input: the name of a
    built-in image (drawn by this module's code), or a file's bytes."""
    from .hashing import digest_file

    if spec.startswith("builtin:"):
        return spec
    p = Path(spec)
    if base is not None and not p.is_absolute():
        p = base / p
    try:
        return digest_file(p)[0]
    except OSError as e:
        raise BadInput(f"cannot read image {spec}: {e}") from None


def write_image(name: str, path: str | Path, size: int = BUILTIN_SIZE, height: Optional[int] = None) -> Path:
    """Write a built-in image as a PNG file (for tests and the CLI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    builtin_image(name, size, height).save(path, format="PNG")
    return path
