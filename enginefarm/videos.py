"""Videos for the video families (LLaVA-NeXT-Video): reading one, sampling
its frames, and the built-in validation videos, drawn by code (no
downloads, no video codec: nothing beyond numpy and Pillow).

A video is given as one of

    builtin:NAME[@WxH[xT]]   drawn by code: orbit, pan, pulse (96 x 96 px, 16 frames unless said)
    DIR                      a directory of frame images (PNG, JPEG, ...), in file-name order
    FILE.npy                 a uint8 array [T, H, W, 3] (numpy.save)

Encoded files (.mp4, .webm, ...) are refused with how to turn them into
frames (`ffmpeg -i clip.mp4 frames/%05d.png`): decoding them would need
PyAV or imageio, which the farm does not depend on.

The engines are built for `components.visual.num_frames` frames per video;
`sample_frames` spreads that many over the video evenly, the first and last
frames included (a shorter video gives all of its frames).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import BadInput

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

BUILTIN = ("orbit", "pan", "pulse")
BUILTIN_SIZE, BUILTIN_FRAMES = 96, 16
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ENCODED = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg")


def _frame(name: str, width: int, height: int, phase: float):
    """One frame at `phase` (0 .. 1) of a built-in video, RGB uint8 [H, W, 3]."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    turn = 2 * np.pi * phase
    if name == "orbit":  # rings around a centre that circles the frame
        r = np.sqrt((x - 0.5 - 0.3 * np.cos(turn)) ** 2 + (y - 0.5 - 0.3 * np.sin(turn)) ** 2)
        rgb = np.stack([0.5 + 0.5 * np.sin(r * 35), 0.5 + 0.5 * np.cos(r * 20), np.full_like(r, phase)], -1)
    elif name == "pan":  # a 6 x 6 checkerboard sliding right, two colours
        c = ((np.floor((x + phase) * 5.999) + np.floor(y * 5.999)) % 2)[..., None]
        rgb = c * np.array([0.95, 0.55, 0.1]) + (1 - c) * np.array([0.1, 0.3, 0.8])
    elif name == "pulse":  # a gradient whose brightness and hue swing
        a = 0.5 + 0.5 * np.sin(turn)
        rgb = np.stack([x * a, y, (1 - x) * (1 - a) + 0.2], -1)
    else:
        raise BadInput(f"no built-in video {name!r}; built-in videos: {', '.join('builtin:' + n for n in BUILTIN)}")
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def builtin_video(spec: str) -> "np.ndarray":
    """NAME or NAME@WxH or NAME@WxHxT -> uint8 [T, H, W, 3]."""
    import numpy as np

    name, _, size = spec.partition("@")
    w, h, t = BUILTIN_SIZE, BUILTIN_SIZE, BUILTIN_FRAMES
    if size:
        try:
            parts = [int(v) for v in size.lower().split("x")]
            if len(parts) not in (2, 3):
                raise ValueError
        except ValueError:
            raise BadInput(f"builtin:{spec}: give the size as WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES, "
                           f"e.g. @64x48x12") from None
        w, h = parts[:2]
        t = parts[2] if len(parts) == 3 else t
    if not (8 <= w <= 4096 and 8 <= h <= 4096 and 1 <= t <= 1024):
        raise BadInput(f"built-in videos are 8 to 4096 px and 1 to 1024 frames (got {w} x {h} x {t})")
    return np.stack([_frame(name, w, h, i / t) for i in range(t)])


def _path(spec: str, base: Optional[Path]) -> Path:
    p = Path(spec)
    return base / p if base is not None and not p.is_absolute() else p


def _frame_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in FRAME_SUFFIXES)


def load_video(spec: str, base: Optional[Path] = None) -> "np.ndarray":
    """A video as uint8 [T, H, W, 3] (see the module's doc for what spec may be)."""
    import numpy as np

    if spec.startswith("builtin:"):
        return builtin_video(spec[len("builtin:"):])
    p = _path(spec, base)
    if p.suffix.lower() in ENCODED:
        raise BadInput(f"cannot read video {spec}: encoded video files need a decoder the farm does not depend on; "
                       f"give a directory of frames (ffmpeg -i {p.name} frames/%05d.png) or a uint8 .npy array "
                       f"[frames, height, width, 3]")
    if p.is_dir():
        files = _frame_files(p)
        if not files:
            raise BadInput(f"video directory {spec} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        from PIL import Image, UnidentifiedImageError

        frames = []
        for f in files:
            try:
                with Image.open(f) as im:
                    frames.append(np.asarray(im.convert("RGB")))
            except (UnidentifiedImageError, OSError) as e:
                raise BadInput(f"cannot read frame {f} of video {spec}: {e}") from None
        sizes = {fr.shape for fr in frames}
        if len(sizes) > 1:
            raise BadInput(f"the frames of video {spec} differ in size: {sorted(sizes)}")
        return np.stack(frames)
    if p.suffix.lower() == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except FileNotFoundError:
            raise BadInput(f"no video file at {spec}") from None
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read video {spec}: {e}") from None
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or 0 in a.shape:
            raise BadInput(f"video {spec}: a .npy video is a uint8 array [frames, height, width, 3]; this one is "
                           f"{a.dtype} {list(a.shape)}")
        return a
    if not p.exists():
        raise BadInput(f"no video at {spec} (a directory of frames, a .npy array, or builtin:NAME)")
    raise BadInput(f"cannot read video {spec}: give a directory of frames or a uint8 .npy array "
                   f"[frames, height, width, 3]")


def sample_frames(video: "np.ndarray", n: int) -> "np.ndarray":
    """n frames spread evenly over the video, first and last included; a
    video of at most n frames is returned whole."""
    import numpy as np

    T = video.shape[0]
    if T <= n:
        return video
    idx = np.linspace(0, T - 1, n).round().astype(int)
    return video[idx]


def video_digest(spec: str, base: Optional[Path] = None) -> str:
    """What a video spec stands for, as a digest input: a built-in video's
    name (drawn by this module's code), or the bytes of its file or frames."""
    from .hashing import digest_bytes, digest_file

    if spec.startswith("builtin:"):
        return spec
    p = _path(spec, base)
    try:
        if p.is_dir():
            return digest_bytes("\n".join(f"{f.name} {digest_file(f)[0]}" for f in _frame_files(p)).encode())
        return digest_file(p)[0]
    except OSError as e:
        raise BadInput(f"cannot read video {spec}: {e}") from None


def write_video(spec: str, path: str | Path) -> Path:
    """Write a built-in video (builtin:NAME[@WxH[xT]] or NAME...) as a .npy
    file (path ends in .npy) or as a directory of PNG frames."""
    import numpy as np

    frames = builtin_video(spec.removeprefix("builtin:"))
    path = Path(path)
    if path.suffix == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, frames, allow_pickle=False)
        return path
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(path / f"{i:05d}.png", format="PNG")
    return path
