"""RandAugment with timm's semantics (``rand-m9-mstd0.5-inc1``), built from DALI auto_aug blocks.

DALI's own ``nvidia.dali.auto_aug.rand_augment`` applies every chosen op with probability 1 at
a fixed magnitude bin. timm (1.0.31, ``rand_augment_transform``) differs, and DeiT/MixPro train
with timm's version, so this module reproduces timm per sample and per layer:

1. choose ``n`` ops uniformly *with* replacement (weighted sets ``tweights``/``t3aw``: weighted,
   *without* replacement, in drawing order, as ``np.random.choice(replace=False, p=w)``);
2. apply each chosen op with probability ``p`` (default 0.5);
3. per application: magnitude ``clip(m + N(0, mstd), 0, mmax)`` (``mstd > 100``:
   ``clip(U(0, m), 0, mmax)``), a fresh random sign for signed ops, timm's level->argument map.

Decisions (op, coin, magnitude, sign) are per-sample DALI random nodes on the CPU, so both
backends and both kernel sets draw the same values for the same seeds and DALI checkpoints
cover them. Kernels (``kernels=``): on gpu images, DALI ``@augmentation`` ops dispatched per
sample by ``auto_aug.core.select`` (the conditional split DALI's rand_augment uses); on cpu
images, Pillow's own ops (``ra_kernels``: one python operator per layer on a thread pool),
because DALI's CPU kernels cost 2-4x more than Pillow's here. Level -> argument maps are one
expression evaluated by DALI (float32) or numpy (float64). Worked example,
``rand-m9-mstd0.5-inc1`` with level 9.4 and sign -1: Rotate -28.2 deg, PosterizeIncreasing
keeps 4 - int(3.76) = 1 bit, SolarizeIncreasing threshold 256 - 240 = 16, BrightnessIncreasing
factor 1 - 0.846 = 0.154. CPU cost in the DeiT training pipeline (224 px, 2 threads, batch 64):
+0.5-1.3 ms of CPU per image with the Pillow kernels (two runs), +1.7 ms with DALI's.

The table compares the DALI kernels (the gpu path); the Pillow kernels equal timm's ops
bitwise for the same argument (tested), except geometric ops are bilinear and 0-bit posterize
is black, as below.

| aspect | vs timm 1.0.31 + PIL |
|---|---|
| string keys m n p mstd mmax inc t, defaults (m=10, n=2, p=0.5, mstd=0, mmax=10) | exact |
| op sets (default, inc1, t3a, tweights, t3aw), op choice, per-op coin p, sign 50/50 | exact (distribution) |
| magnitude noise, mstd>100 uniform rule, clip to [0, mmax], level->arg maps | exact (float32) |
| Invert, Posterize*, Solarize*, SolarizeAdd (LUT ops) | bitwise |
| Brightness/Contrast/Color (PIL blends), Desaturate | +-1-2 levels (rounding; PIL rounds the contrast mean and gray) |
| AutoContrast | +-1 level (PIL truncates its LUT, DALI rounds) |
| Sharpness | interior +-1; 1 px border differs (PIL keeps it, DALI reflects) |
| Equalize | bitwise: Pillow's histogram + LUT formula as a torch kernel on the images' device (DALI's ``fn.equalize`` is OpenCV's formula) |
| GaussianBlur | close: DALI true Gaussian, PIL extended box blur approximation |
| Rotate/Shear/Translate | same matrix and pixel convention as PIL; bilinear only (DALI warp_affine has no cubic, timm: random bilinear/bicubic or the train interpolation); edge pixels blend with the fill |
| fill of geometric ops | per-channel; default (124, 116, 104) = round(255*mean) as timm's create_transform passes (bare rand_augment_transform uses 128) |
| PosterizeIncreasing at level 10 (0 bits) | black image, as timm intends and Pillow < 10 did; Pillow 13 raises ValueError (the DeiT crash) |
| unknown or repeated key, bad t name, inc other than 0/1, mmax0 | ValueError (timm: assert, silent skip, last/first wins, default set, ``0 == 10``) |
| horizontal flip (``flip_rand_augment``) | before the ops, as timm's RandomHorizontalFlip -> RandAugment: exact (ShearY's fill wedge on timm's side) |
| random streams | not timm's Python RNG: same distributions, different draws |
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as dali_aug
from nvidia.dali.auto_aug.core import augmentation, select
from nvidia.dali.data_node import DataNode

from .compat import conditionals_enabled
from .options import DEFAULT_AUTO_AUGMENT

__all__ = ["RandAugmentPolicy", "parse_policy", "rand_augment", "flip_rand_augment",
           "TRANSFORM_SETS", "OP_NAMES", "RA_BACKENDS"]

_LEVEL_DENOM = 10.0
IMAGENET_FILL = (124, 116, 104)  # round(255 * IMAGENET_DEFAULT_MEAN), timm create_transform's img_mean

# timm/data/auto_augment.py: _RAND_TRANSFORMS, _RAND_INCREASING_TRANSFORMS, _RAND_3A, weighted sets.
_GEOMETRIC = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_DEFAULT = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
            "Color", "Contrast", "Brightness", "Sharpness") + _GEOMETRIC
_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
               "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
               "BrightnessIncreasing", "SharpnessIncreasing") + _GEOMETRIC
_WEIGHTS_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
              "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
              "SolarizeIncreasing": .05, "SolarizeAdd": .05, "ContrastIncreasing": .05,
              "BrightnessIncreasing": .05, "Equalize": .05, "PosterizeIncreasing": 0.05,
              "Invert": 0.05}
_WEIGHTS_3A = {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3,
               "ShearX": 2, "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1,
               "ColorIncreasing": 1, "SharpnessIncreasing": 1, "ContrastIncreasing": 1,
               "BrightnessIncreasing": 1, "Equalize": 1, "Invert": 1}
# t<name> -> (transforms, weights or None); "" = the default / inc1 set
TRANSFORM_SETS = {
    "weights": (tuple(_WEIGHTS_0), tuple(_WEIGHTS_0.values())),
    "3aw": (tuple(_WEIGHTS_3A), tuple(_WEIGHTS_3A.values())),
    "3a": (("SolarizeIncreasing", "Desaturate", "GaussianBlur"), None),
}
_INT_KEYS, _FLOAT_KEYS = ("m", "n", "mmax", "inc"), ("p", "mstd")


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
    """Resolved timm RandAugment policy. ``transforms`` are timm op names (see ``OP_NAMES``);
    ``weights`` None = uniform choice with replacement, else weighted without replacement."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # math.inf: magnitude ~ U(0, m)
    magnitude_max: float = 10.0
    transforms: tuple[str, ...] = _DEFAULT
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "transforms", tuple(self.transforms))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        _check(self.magnitude >= 0, f"magnitude must be >= 0, got {self.magnitude}")
        _check(isinstance(self.num_layers, int) and self.num_layers >= 0,
               f"num_layers must be an integer >= 0, got {self.num_layers!r}")
        _check(0.0 <= self.prob <= 1.0, f"prob must be in [0, 1], got {self.prob}")
        _check(self.magnitude_std >= 0, f"magnitude_std must be >= 0 (inf: uniform), got "
               f"{self.magnitude_std}")
        _check(self.magnitude_max > 0, f"magnitude_max must be > 0, got {self.magnitude_max}")
        _check(len(self.transforms) > 0, "transforms must name at least one op")
        unknown = [t for t in self.transforms if t not in _OPS]
        _check(not unknown, f"unknown RandAugment op(s) {unknown}; valid: {sorted(_OPS)}")
        if self.weights is not None:
            _check(len(self.weights) == len(self.transforms),
                   f"weights has {len(self.weights)} entries for {len(self.transforms)} transforms")
            _check(all(w >= 0 and math.isfinite(w) for w in self.weights),
                   f"weights must be finite and >= 0, got {self.weights}")
            positive = sum(w > 0 for w in self.weights)
            _check(self.num_layers <= positive, f"num_layers={self.num_layers} exceeds the "
                   f"{positive} ops with positive weight (weighted choice has no replacement)")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def parse_policy(policy: str) -> RandAugmentPolicy:
    """Parse timm's ``rand-mM-nN-pP-mstdS-mmaxX-incB-tNAME`` string (sections in any order).

    ``parse_policy("rand-m9-mstd0.5-inc1")`` -> m=9, n=2, p=0.5, mstd=0.5, mmax=10, inc1 op set.
    """
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str like 'rand-m9-mstd0.5-inc1', got {type(policy)}")
    head, *sections = policy.split("-")
    _check(head == "rand", f"RandAugment policy must start with 'rand', got {policy!r} "
           "(example: 'rand-m9-mstd0.5-inc1')")
    values: dict[str, object] = {}
    for section in sections:
        if section.startswith("t"):  # timm tests 't' before the numeric keys
            key, raw = "t", section[1:]
        else:
            match = re.fullmatch(r"([a-z]+)(\d.*)", section)
            key, raw = (match.group(1), match.group(2)) if match else (section, "")
            _check(key in _INT_KEYS + _FLOAT_KEYS, f"unknown RandAugment key {key!r} in section "
                   f"{section!r} of {policy!r}; valid keys: m, n, p, mstd, mmax, inc, t")
        _check(key not in values, f"RandAugment key {key!r} given twice in {policy!r}")
        values[key] = _parse_value(key, raw, policy)
    return _resolve(values)


def _parse_value(key: str, raw: str, policy: str):
    if key == "t":
        _check(raw in TRANSFORM_SETS, f"unknown RandAugment transform set 't{raw}' in "
               f"{policy!r}; valid: {', '.join('t' + k for k in TRANSFORM_SETS)}")
        return raw
    try:
        value = int(raw) if key in _INT_KEYS else float(raw)
    except ValueError:
        kind = "an integer" if key in _INT_KEYS else "a number"
        raise ValueError(f"RandAugment key {key!r} needs {kind}, got {raw!r} in {policy!r}")
    _check(key != "inc" or value in (0, 1), f"RandAugment key 'inc' must be 0 or 1, got {raw!r}")
    _check(key != "mmax" or value >= 1, f"RandAugment key 'mmax' must be >= 1, got {raw!r} "
           "(timm silently reads mmax0 as 10)")
    return value


def _resolve(values: dict) -> RandAugmentPolicy:
    mstd = float(values.get("mstd", 0.0))
    if "t" in values:
        transforms, weights = TRANSFORM_SETS[values["t"]]
    else:
        transforms, weights = (_INCREASING if values.get("inc", 0) else _DEFAULT), None
    return RandAugmentPolicy(
        magnitude=float(values.get("m", _LEVEL_DENOM)), num_layers=values.get("n", 2),
        prob=float(values.get("p", 0.5)), magnitude_std=math.inf if mstd > 100 else mstd,
        magnitude_max=float(values.get("mmax", _LEVEL_DENOM)), transforms=transforms,
        weights=weights)


# ---- level -> op argument: timm's LEVEL_TO_ARG, one definition for DALI nodes and torch ----
# `level` is the per-sample *signed* magnitude (timm's random sign times the clipped magnitude),
# one node instead of two through every conditional split; unsigned ops take its abs. `m` is the
# arithmetic backend: _DALI (DataNodes: the GPU path, kernels="dali") or _NUMPY (float32 scalars:
# the Pillow kernels of ra_kernels), so both paths compute every argument with one expression.
class _DaliMath:
    abs, floor, clamp = staticmethod(dmath.abs), staticmethod(dmath.floor), staticmethod(dmath.clamp)
    min, max = staticmethod(dmath.min), staticmethod(dmath.max)

    @staticmethod
    def int(x):  # python int() of a non-negative float: floor, then an exact cast
        return fn.cast(dmath.floor(x), dtype=types.INT32)

    @staticmethod
    def uint8(x):
        return fn.cast(x, dtype=types.UINT8)


class _NumpyMath:  # numpy scalars (float64, as timm), for the Pillow kernels of ra_kernels
    abs, floor, clamp = staticmethod(np.abs), staticmethod(np.floor), staticmethod(np.clip)
    min, max = staticmethod(np.minimum), staticmethod(np.maximum)

    @staticmethod
    def int(x):
        return np.floor(x).astype(np.int32)

    @staticmethod
    def uint8(x):
        return np.asarray(x).astype(np.uint8)


_DALI, _NUMPY = _DaliMath(), _NumpyMath()


def _signed(scale):
    return lambda level, m=_DALI: level * (scale / _LEVEL_DENOM)


def _unsigned(level, scale, m):
    return m.abs(level) * (scale / _LEVEL_DENOM)


def _enhance(level, m=_DALI):
    return _unsigned(level, 1.8, m) + 0.1


def _enhance_increasing(level, m=_DALI):
    return m.max(1.0 + level * (0.9 / _LEVEL_DENOM), 0.1)


def _posterize(level, m=_DALI):
    return m.int(_unsigned(level, 4.0, m))


def _posterize_increasing(level, m=_DALI):
    return 4 - _posterize(level, m)


def _solarize(level, m=_DALI):
    return m.min(m.int(_unsigned(level, 256.0, m)), 256)


def _solarize_increasing(level, m=_DALI):
    return 256 - _solarize(level, m)


def _solarize_add(level, m=_DALI):
    return m.uint8(m.min(m.int(_unsigned(level, 110.0, m)), 128))


def _desaturate(level, m=_DALI):  # timm: clamp(1 - clamp(0.5 + 0.5 * level / 10, 0.5, 1), 0, 1)
    return 1.0 - m.clamp(0.5 + _unsigned(level, 0.5, m), 0.5, 1.0)


def _blur_radius(level, m=_DALI):
    return m.clamp(0.1 + _unsigned(level, 1.9, m), 0.1, 2.0)


# ---- kernels: kernel(data, arg, *, fill, size); uint8 HWC, cpu or gpu ----
_POSTERIZE_MASKS = np.array([256 - 2 ** (8 - b) for b in range(9)], np.uint8)  # bits 0..8
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL ImageFilter.SMOOTH
_DELTA = np.pad(np.ones((1, 1), np.float32), 1)


def _posterize_kernel(data, bits, **_):
    mask = types.Constant(_POSTERIZE_MASKS)[dmath.clamp(bits, 0, 8)]
    return dali_aug.posterize.op(data, mask)


def _sharpness_kernel(data, factor, **_):
    kernel = types.Constant(_SMOOTH - _DELTA) * (1.0 - factor) + types.Constant(_DELTA)  # (3, 3)
    return fn.filter(data, kernel.gpu() if data.device == "gpu" else kernel)  # dali_aug.sharpness


def _warp(data, matrix, fill):
    """PIL ``Image.transform(AFFINE)``: ``dst(x, y) = src(M @ (x, y, 1))``, pixel corner at 0."""
    kw = dict(matrix=matrix, inverse_map=True, interp_type=types.INTERP_LINEAR)
    if fill is None:
        return fn.warp_affine(data, **kw)
    if len(set(fill)) == 1:
        return fn.warp_affine(data, fill_value=float(fill[0]), **kw)
    shift = types.Constant(np.array(fill, np.int16).reshape(1, 1, -1))  # (1, 1, C)
    moved = fn.warp_affine(fn.cast(data, dtype=types.INT16) - shift, fill_value=0.0, **kw)
    return fn.cast_like(moved + shift, data)  # per-channel fill: warp_affine takes a scalar


# fn.transforms matrices used as dst->src maps are exactly PIL's matrices for these ops
def _shear_x(data, factor, *, fill, size):
    return _warp(data, fn.transforms.shear(shear=fn.stack(factor, factor * 0.0)), fill)


def _shear_y(data, factor, *, fill, size):
    return _warp(data, fn.transforms.shear(shear=fn.stack(factor * 0.0, factor)), fill)


def _translate(axis):
    def kernel(data, pct, *, fill, size):  # size: (W, H); timm: pixels = pct * img.size[axis]
        onehot = types.Constant(np.eye(2, dtype=np.float32)[axis])
        return _warp(data, fn.transforms.translation(offset=size * onehot * pct), fill)
    return kernel


def _rotate(data, degrees, *, fill, size):
    """PIL ``Image.rotate``: counter-clockwise about (W/2, H/2), same size."""
    return _warp(data, fn.transforms.rotation(angle=degrees, center=size * 0.5), fill)


def _equalize_kernel(data, _):
    """Pillow's Equalize (ra_kernels.equalize, a torch kernel on the images' device), not DALI's
    ``fn.equalize`` (OpenCV's formula; DALI's CPU operator differed from Pillow by a mean of
    1.7-46 levels per image on 224 px photo-like crops, 0.4-27 with clipped highlights)."""
    from .ra_kernels import TorchEqualize

    gpu = data.device == "gpu"
    return fn.dl_tensor_python_function(
        data, function=TorchEqualize(data.device), batch_processing=True, num_outputs=1,
        device=data.device, synchronize_stream=not gpu, output_layouts="HWC")


def _gaussian_blur(data, radius, **_):
    return fn.gaussian_blur(data, sigma=radius)


def _simple(op):
    return lambda data, arg, **_: op(data, arg)


# timm name -> (kernel, level_to_arg); level_to_arg None = op without argument
_OP_TABLE = {
    "AutoContrast": (dali_aug.auto_contrast.op, None),
    "Equalize": (_equalize_kernel, None),
    "Invert": (dali_aug.invert.op, None),
    "Rotate": (_rotate, _signed(30.0)),
    "Posterize": (_posterize_kernel, _posterize),
    "PosterizeIncreasing": (_posterize_kernel, _posterize_increasing),
    "Solarize": (_simple(dali_aug.solarize.op), _solarize),
    "SolarizeIncreasing": (_simple(dali_aug.solarize.op), _solarize_increasing),
    "SolarizeAdd": (_simple(dali_aug.solarize_add.op), _solarize_add),
    "Color": (_simple(dali_aug.color.op), _enhance),
    "ColorIncreasing": (_simple(dali_aug.color.op), _enhance_increasing),
    "Contrast": (_simple(dali_aug.contrast.op), _enhance),
    "ContrastIncreasing": (_simple(dali_aug.contrast.op), _enhance_increasing),
    "Brightness": (_simple(dali_aug.brightness.op), _enhance),
    "BrightnessIncreasing": (_simple(dali_aug.brightness.op), _enhance_increasing),
    "Sharpness": (_sharpness_kernel, _enhance),
    "SharpnessIncreasing": (_sharpness_kernel, _enhance_increasing),
    "ShearX": (_shear_x, _signed(0.3)),
    "ShearY": (_shear_y, _signed(0.3)),
    "TranslateXRel": (_translate(0), _signed(0.45)),
    "TranslateYRel": (_translate(1), _signed(0.45)),
    "Desaturate": (_simple(dali_aug.color.op), _desaturate),
    "GaussianBlur": (_gaussian_blur, _blur_radius),
}
OP_NAMES = tuple(_OP_TABLE)
_NEEDS_SIZE = {"Rotate", "TranslateXRel", "TranslateYRel"}


def _make_op(name, kernel, level_to_arg):
    if level_to_arg is None:
        def op(data, _):
            return kernel(data, None)
    elif name in _NEEDS_SIZE:
        def op(data, _, level, fill, size):
            return kernel(data, level_to_arg(level), fill=fill, size=size)
    else:
        def op(data, _, level, fill):
            return kernel(data, level_to_arg(level), fill=fill, size=None)
    return augmentation(op, name=name)


_OPS = {name: _make_op(name, *entry) for name, entry in _OP_TABLE.items()}


# ---- sampling (all per-sample CPU DataNodes) and the augmentation itself ----
def _seeds(seed: int | None, count: int) -> list[int | None]:
    """Distinct seeds per random op; None lets DALI derive them from the pipeline seed."""
    if seed is None:
        return [None] * count
    return [int(s) & 0x7FFFFFFF for s in np.random.SeedSequence(seed).generate_state(count)]


def sample_ops(policy: RandAugmentPolicy, seeds: Sequence[int | None]) -> list[DataNode]:
    """num_layers int32 op indices per sample, timm's ``np.random.choice(ops, n, replace, p)``."""
    k = len(policy.transforms)
    if policy.weights is None:
        return [fn.random.uniform(values=list(range(k)), dtype=types.INT32, seed=s)
                for s in seeds[:policy.num_layers]]
    # successive weighted sampling without replacement: renormalize over the ops left each layer
    weights = np.array(policy.weights, np.float32)
    iota = types.Constant(np.arange(k, dtype=np.int32))
    left = None  # (k,) float 1 = not chosen yet
    chosen = []
    for s in seeds[:policy.num_layers]:
        if left is None:
            idx = fn.random.choice(k, p=list(weights / weights.sum()), seed=s)
            left = fn.cast(iota != idx, dtype=types.FLOAT)
        else:
            w = left * types.Constant(weights)  # (k,)
            idx = fn.random.choice(k, p=w / fn.reductions.sum(w), seed=s)
            left = left * fn.cast(iota != idx, dtype=types.FLOAT)
        chosen.append(fn.cast(idx, dtype=types.INT32))
    return chosen


def sample_level(policy: RandAugmentPolicy, seed: int | None) -> DataNode:
    """float32 magnitude per sample: clip(m + N(0, mstd), 0, mmax), or clip(U(0, m), ...)."""
    m, std, top = policy.magnitude, policy.magnitude_std, policy.magnitude_max
    if std == 0 or m == 0 and math.isinf(std):
        return fn.constant(fdata=float(min(max(m, 0.0), top)), shape=[])
    if math.isinf(std):
        raw = fn.random.uniform(range=[0.0, m], seed=seed)
    else:
        raw = fn.random.normal(mean=m, stddev=std, seed=seed)
    return dmath.clamp(raw, 0.0, top)


def _check_input(images, fill):
    if not isinstance(images, DataNode):
        raise TypeError(f"images must be a DALI DataNode (inside @pipeline_def), got {type(images)}")
    if conditionals_enabled() is False:
        raise ValueError("rand_augment needs a pipeline built with "
                         "@pipeline_def(enable_conditionals=True)")
    if fill is not None and (len(fill) not in (1, 3) or not all(0 <= v <= 255 for v in fill)):
        raise ValueError(f"fill must be None, an int or 3 ints in [0, 255], got {fill}")


RA_BACKENDS = ("auto", "pillow", "dali")


def rand_augment(images: DataNode, policy: str | RandAugmentPolicy = DEFAULT_AUTO_AUGMENT, *,
                 fill: int | Sequence[int] | None = IMAGENET_FILL,
                 seed: int | None = None, kernels: str = "auto",
                 threads: int | None = None) -> DataNode:
    """timm RandAugment on a batch of uint8 HWC images (cpu or gpu DataNode), same shape/dtype.
    See ``flip_rand_augment`` for the arguments."""
    return _rand_augment(images, policy, None, fill=fill, seed=seed, kernels=kernels,
                         threads=threads)[0]


def flip_rand_augment(images: DataNode, mirror: DataNode | None,
                      policy: str | RandAugmentPolicy = DEFAULT_AUTO_AUGMENT, *,
                      fill: int | Sequence[int] | None = IMAGENET_FILL, seed: int | None = None,
                      kernels: str = "auto", threads: int | None = None
                      ) -> tuple[DataNode, DataNode | None]:
    """timm's ``RandomHorizontalFlip -> RandAugment`` on a batch of uint8 HWC images (cpu or gpu
    DataNode), same shape/dtype. Returns ``(images, mirror_left)``.

    ``mirror``: per-sample 0/1 (e.g. ``fn.random.coin_flip``): flip horizontally before the ops
    (None: no flip; ``mirror_left`` None). The flip is done right before a sample's first applied op, inside that op's pass
    (Pillow: one ``transpose``); samples no op touches are not flipped here, and
    ``mirror_left`` (int32 0/1) says which flips are still owed: hand it to the next pass
    (``normalize(mirror=...)`` does it for free). Flipping after the ops is not equivalent:
    ShearY's fill wedge would land on either side instead of timm's one side.
    ``fill``: color of the area geometric ops uncover (per channel; None repeats the border).
    ``seed``: seeds this op's random streams; None derives them from the pipeline seed.
    ``kernels``: who applies the ops once DALI has drawn the decisions: "dali" (DALI operators in
    conditional branches), "pillow" (``ra_kernels``: one python operator per layer running
    Pillow's ops on ``threads`` workers, default the pipeline's num_threads; cpu images only) or
    "auto" (Pillow for cpu images, DALI for gpu images or ``fill=None``). Same draws either way.
    Needs ``@pipeline_def(enable_conditionals=True)``; gpu images also need DALI's default
    dynamic executor (the image size is read on the CPU for Rotate/Translate).
    """
    if mirror is not None and not isinstance(mirror, DataNode):
        raise TypeError(f"mirror must be a DALI DataNode of per-sample 0/1 or None, got "
                        f"{type(mirror).__name__}")
    return _rand_augment(images, policy, mirror, fill=fill, seed=seed, kernels=kernels,
                         threads=threads)


def _rand_augment(images, policy, mirror, *, fill, seed, kernels, threads):
    """(images, mirror_left); mirror None: no flip (mirror_left None)."""
    if kernels not in RA_BACKENDS:
        raise ValueError(f"kernels must be one of {RA_BACKENDS}, got {kernels!r}")
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    if not isinstance(policy, RandAugmentPolicy):
        raise TypeError(f"policy must be a str or RandAugmentPolicy, got {type(policy)}")
    fill = (fill,) if isinstance(fill, (int, np.integer)) else fill
    fill = None if fill is None else tuple(int(v) for v in fill)
    _check_input(images, fill)
    n = policy.num_layers
    if n == 0 or policy.prob == 0:
        return images, mirror
    left = None if mirror is None else fn.cast(mirror, dtype=types.INT32)  # flips still owed
    use_pillow = kernels == "pillow" or (kernels == "auto" and images.device == "cpu"
                                         and fill is not None)
    if use_pillow and images.device != "cpu":
        raise ValueError("kernels='pillow' runs on cpu images only; use 'auto' or 'dali' for gpu")
    seeds = _seeds(seed, 4 * n)
    ops = [_OPS[name] for name in policy.transforms]
    op_idx = sample_ops(policy, seeds[:n])
    size = None  # (W, H) float32, PIL's img.size
    if not use_pillow and _NEEDS_SIZE & set(policy.transforms):
        hwc = images.shape(dtype=types.INT32)
        size = fn.cast(fn.stack(hwc[1], hwc[0]), dtype=types.FLOAT)
    layer_op = _pillow_layer(policy, fill, threads) if use_pillow else None
    for layer in range(n):
        s_apply, s_level, s_sign = seeds[n + 3 * layer: n + 3 * layer + 3]
        sign = fn.random.uniform(values=[-1.0, 1.0], seed=s_sign)
        level = sample_level(policy, s_level) * sign
        apply = None
        if policy.prob < 1.0:
            apply = fn.random.coin_flip(probability=policy.prob, dtype=types.BOOL, seed=s_apply)
        flip = None                              # flip now: owed and this layer's op applies
        if left is not None:
            flip = left if apply is None else left * fn.cast(apply, dtype=types.INT32)
            left = left - flip
        if layer_op is not None:
            on = 1.0 if apply is None else fn.cast(apply, dtype=types.FLOAT)
            fields = [fn.cast(op_idx[layer], dtype=types.FLOAT), on, level]
            if flip is not None:
                fields.append(fn.cast(flip, dtype=types.FLOAT))
            images = fn.dl_tensor_python_function(
                images, fn.stack(*fields), function=layer_op, batch_processing=True,
                num_outputs=1, output_layouts="HWC", synchronize_stream=False)
            continue
        kwargs = dict(level=level, fill=fill)
        if size is not None:
            kwargs["size"] = size
        if apply is not None:
            if apply:
                images = _select(ops, op_idx[layer], images, flip, kwargs)
        else:
            images = _select(ops, op_idx[layer], images, flip, kwargs)
    return images, left


def _select(ops, op_idx, images, flip, kwargs):
    if flip is not None:
        images = fn.flip(images, horizontal=flip)
    return select(ops, op_idx, images, **kwargs)


def _pillow_layer(policy: RandAugmentPolicy, fill, threads: int | None):
    """ra_kernels.RandAugmentLayer for the policy's ops, with the same level maps as DALI's."""
    from nvidia.dali.pipeline import Pipeline

    from .decode import worker_pool
    from .ra_kernels import RandAugmentLayer

    if threads is None:
        current = Pipeline.current()
        threads = current.num_threads if current is not None else 1
    maps = [_OP_TABLE[name][1] for name in policy.transforms]
    return RandAugmentLayer(policy.transforms, maps, _NUMPY, fill,
                            pool=worker_pool(threads) if threads > 1 else None)
