"""`DataOptions`: the one declaration of the data options (augmentation and decode settings),
with their defaults and their validation.

Everything that builds a loader takes it whole: `TrainLoader(source, options=...)` and
`ValLoader(source, options=...)` (the loaders also accept the fields as keywords, see
docs/interfaces.md), the benchmarks, `python -m train` (train's `DataConfig` extends it, so the
YAML keys under `data:` are these field names) and `python -m train.evaluate`.

Not options: where and how a loader runs (source, batch size, device, shards, threads, seed,
the output `dtype`, `exclude`): those are the loaders' own arguments. The annotations are the
types train's config checks YAML values against (`Union[...]`, `tuple[...]`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Union

from .decode import DEFAULT_HW_DECODER_LOAD, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

__all__ = ["DataOptions", "DEFAULT_AUTO_AUGMENT", "DEFAULT_HW_DECODER_LOAD", "option_names"]

DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
"""timm's RandAugment string of the DeiT / MixPro recipe."""


@dataclass(frozen=True)
class DataOptions:
    """Augmentation and decode settings (defaults: DeiT / MixPro recipe).

    image_size: int or (H, W); auto_augment: a timm RandAugment string, a RandAugmentPolicy, or
    None (off); re_prob: random erasing probability (pixel mode); scale / ratio / hflip: random
    resized crop and flip; crop_pct: validation center crop (resize to size / crop_pct first);
    mean / std: normalization; hw_decoder_load: share of each batch on the hardware JPEG decoder
    (GPU); initial_fill: the reader's shuffle buffer."""

    image_size: Union[int, tuple[int, int]] = 224
    auto_augment: Union[str, None] = DEFAULT_AUTO_AUGMENT
    re_prob: float = 0.25
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD
    initial_fill: int = 1024

    _prefix = ""        # error messages name fields as f"{_prefix}{field}" (not a field)

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        self._check_image_size()
        lo, hi = self.scale
        self._check(0 < lo <= hi <= 1, "scale", "satisfy 0 < min <= max <= 1")
        lo, hi = self.ratio
        self._check(0 < lo <= hi, "ratio", "satisfy 0 < min <= max")
        for name in ("re_prob", "hflip", "hw_decoder_load"):
            v = getattr(self, name)
            self._check(0.0 <= v <= 1.0, name, "be in [0, 1]")
        self._check(0.0 < self.crop_pct <= 1.0, "crop_pct", "be in (0, 1]")
        self._check(self.interpolation in INTERPOLATIONS, "interpolation",
                    f"be one of {INTERPOLATIONS}")
        self._check(all(s > 0 for s in self.std), "std", "be positive")
        fill = self.initial_fill
        self._check(not isinstance(fill, bool) and isinstance(fill, int) and fill >= 1,
                    "initial_fill", "be an int >= 1")

    def _check(self, cond: bool, name: str, rule: str) -> None:
        if not cond:
            raise ValueError(f"{self._prefix}{name} must {rule}, got {getattr(self, name)!r}")

    def _check_image_size(self) -> None:
        size = self.image_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        self._check(len(hw) == 2 and not any(isinstance(v, bool) or not isinstance(v, int)
                                             or v <= 0 for v in hw),
                    "image_size", "be a positive int or (H, W)")

    @property
    def hw(self) -> tuple[int, int]:
        """image_size as (H, W)."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else tuple(s)  # type: ignore[return-value]

    def data_options(self) -> "DataOptions":
        """These settings as a plain DataOptions (from a subclass such as train's DataConfig)."""
        if type(self) is DataOptions:
            return self
        return DataOptions(**{f: getattr(self, f) for f in option_names()})

    def replace(self, **changes: Any) -> "DataOptions":
        """A copy with `changes` (validated again); unknown names are a TypeError."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(cls, options: "DataOptions | None", changes: Mapping[str, Any],
                caller: str) -> "DataOptions":
        """`options` (default: the defaults) with the keyword `changes` of `caller`'s call,
        which must name option fields: an unknown keyword is the TypeError a function gives."""
        if options is not None and not isinstance(options, DataOptions):
            raise TypeError(f"{caller}: options must be a DataOptions or None, got "
                            f"{type(options).__name__}")
        names = option_names()
        for key in changes:
            if key not in names:
                raise TypeError(f"{caller}() got an unexpected keyword argument {key!r} (data "
                                f"options: {', '.join(names)})")
        base = options.data_options() if options is not None else cls()
        return base.replace(**changes) if changes else base


def option_names() -> tuple[str, ...]:
    """The field names of DataOptions, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(DataOptions))
