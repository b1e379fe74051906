"""Is DALI's decode of a file right? Compare its pixels with Pillow's, where Pillow reads the file.

The reference is Pillow's image with its EXIF orientation applied (`ImageOps.exif_transpose`)
as RGB uint8; 16-bit samples are mapped to 8 bits as DALI does (round(v / 257)). A decode is
wrong when the size differs or when the pixels differ by more than codec noise: mean |diff|
above MEAN_TOL levels or more than BAD_PIXEL_FRACTION of the values off by more than
BAD_PIXEL_LEVELS (two JPEG decoders with different IDCT/upsampling differ by a few levels;
the wrong decodes seen on Pillow's test corpus differ by 12-130 levels on average).
A file Pillow cannot read is "unverified": DALI's decode is kept (BigTIFF, for example).
"""
from __future__ import annotations

import io
import warnings

import numpy as np

__all__ = ["MEAN_TOL", "BAD_PIXEL_LEVELS", "BAD_PIXEL_FRACTION", "reference", "compare"]

MEAN_TOL = 3.0
BAD_PIXEL_LEVELS = 48
BAD_PIXEL_FRACTION = 0.01
_ORIENTATION = 0x0112


def _to_rgb8(im) -> np.ndarray:
    """(H, W, 3) uint8 of a Pillow image; 16/32-bit integer modes divided by 257 like DALI."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("floating-point samples")
    return np.asarray(im.convert("RGB"))


LOW_BITS = 4096                 # 16-bit samples all below this: 12-bit data in 16-bit words


def reference(data: bytes) -> tuple[np.ndarray, np.ndarray, int, int, str, str | None]:
    """(oriented RGB, unoriented RGB, EXIF orientation, frames, Pillow format/mode, a reason the file
    is wrong for training whatever the decoder does, or None) of `data`; raises whatever
    Pillow raises for a file it cannot read."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            orientation = int(im.getexif().get(_ORIENTATION, 1) or 1)
            raw = _to_rgb8(im)
            oriented = _to_rgb8(ImageOps.exif_transpose(im)) if orientation != 1 else raw
            frames = int(getattr(im, "n_frames", 1))
            return oriented, raw, orientation, frames, f"{im.format} {im.mode}", _unfit(im)


def _unfit(im) -> str | None:
    if im.mode.startswith("I;16"):
        top = int(np.asarray(im).max())
        if 0 < top < LOW_BITS:
            return (f"16-bit data in the low bits: samples reach only {top} of 65535 (12-bit "
                    f"data?); DALI scales 16-bit samples by 1/257, so it decodes to levels "
                    f"0..{round(top / 257)} (nearly black)")
    return None


def _differs(a: np.ndarray, b: np.ndarray) -> str | None:
    if a.shape != b.shape:
        return f"size {a.shape[1]}x{a.shape[0]} but Pillow's is {b.shape[1]}x{b.shape[0]}"
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mean, far = float(diff.mean()), float((diff > BAD_PIXEL_LEVELS).mean())
    if mean > MEAN_TOL or far > BAD_PIXEL_FRACTION:
        return f"mean |diff| {mean:.1f} levels, {100 * far:.1f}% of values off by >{BAD_PIXEL_LEVELS}"
    return None


def compare(data: bytes, decoded: np.ndarray, again: np.ndarray | None = None) -> list:
    """[status, reason] for DALI's `decoded` (H, W, 3) uint8 of `data`: "ok", "unverified"
    (Pillow cannot read it; reason says why) or "bad" (wrong pixels; reason says how).
    again: a second decode of the same bytes, which must be identical."""
    if again is not None and not np.array_equal(decoded, again):
        return ["bad", "nondeterministic decode: two DALI decodes of the same bytes differ"]
    try:
        oriented, raw, orientation, frames, what, unfit = reference(data)
    except Exception as e:  # noqa: BLE001 (any Pillow failure: nothing to compare with)
        return ["unverified", f"Pillow cannot read it ({type(e).__name__}: {str(e)[:120]})"]
    if unfit:
        return ["bad", unfit]
    why = _differs(decoded, oriented)
    if why is None:
        return ["ok", what]
    if orientation != 1 and _differs(decoded, raw) is None:
        return ["bad", f"EXIF orientation ignored: DALI does not apply orientation "
                       f"{orientation} in {what.split()[0]} files"]
    if frames > 1:
        return ["bad", f"animated: DALI decodes this {what.split()[0]} of {frames} frames "
                       f"otherwise than Pillow's first frame ({why})"]
    return ["bad", f"wrong pixels: DALI's decode differs from Pillow's ({what}): {why}"]
