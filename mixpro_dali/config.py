"""MixConfig: what the MaskMix operator draws per batch, validated at construction.

Presets: one per mixing method of the registry (`mixpro_dali.methods`: none, deit, transmix,
maskmix, mixpro, mixpro-official, and any registered one); `MixConfig.preset(name)` builds
the method's config. docs/method.md section 8 has the table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .masks import MODES, mixing_modes
from .methods import PARTNERS, PRESETS

__all__ = ["MixConfig", "MODES", "PRESETS", "PARTNERS"]


def __getattr__(name: str) -> Any:
    if name == "MIX_KEYS":  # the old name of the mixing modes (a live view of the registry)
        return mixing_modes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _as_hw(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or (H, W), got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or (H, W), got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


@dataclass(frozen=True)
class MixConfig:
    """Per-batch mixing policy of the MaskMix operator (defaults: the MixPro paper).

    image_size: int or (H, W) of the images reaching the operator.
    patch_size: the model's patch P; H and W must be multiples of it.
    mask_patch: MaskMix cell side C in pixels, a positive multiple of patch_size. Cells that do
        not divide the image are clipped at the bottom/right edges (224 px, C=64 -> 4x4 cells,
        the last row/column 32 px), so every token still comes from exactly one image.
    probs: probability of each mode per batch ({"maskmix", "cutmix", "mixup"}); the remaining
        mass is "no mixing".
    beta: MaskMix ratio tau ~ Beta(beta, beta).   mixup_alpha / cutmix_alpha: as timm.
    rounding: "floor" (paper, floor(S*tau) cells) or "ceil" (official code).
    partner: "flip" (x.flip(0), paper Alg. 1, timm) or "perm" (random permutation), for every
        mode, or a mapping per mode ({"maskmix": "perm"}; modes left out: "flip"). The official
        code pairs MaskMix batches by permutation and Mixup/CutMix ones by timm's flip.
    per_sample_ratio: one tau per sample instead of one per batch.
    seed: base of the pure (seed, shard, batch index) random stream.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    mask_patch: int = 64
    probs: Mapping[str, float] = field(default_factory=lambda: dict(PRESETS["mixpro"]["probs"]))
    beta: float = 1.0
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    rounding: str = "floor"
    partner: str | Mapping[str, str] = "flip"
    per_sample_ratio: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("image_size", _as_hw(self.image_size, "image_size"))
        for name in ("patch_size", "mask_patch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        p = self.patch_size
        if self.mask_patch % p:
            raise ValueError(
                f"mask_patch must be a positive multiple of patch_size={p}, got {self.mask_patch}"
            )
        h, w = self.image_size
        if h % p or w % p:
            raise ValueError(
                f"image_size {h}x{w} must be a multiple of patch_size={p} on both sides "
                "(every token must be a whole patch)"
            )
        set_("probs", self._check_probs(self.probs))
        for name in ("beta", "mixup_alpha", "cutmix_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
            set_(name, float(v))
        if self.rounding not in ("floor", "ceil"):
            raise ValueError(f"rounding must be 'floor' or 'ceil', got {self.rounding!r}")
        set_("partner", self._check_partner(self.partner))
        if not isinstance(self.per_sample_ratio, bool):
            raise TypeError(f"per_sample_ratio must be a bool, got {self.per_sample_ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    @staticmethod
    def _check_probs(probs: Any) -> dict[str, float]:
        if not isinstance(probs, Mapping):
            raise TypeError(f"probs must be a mapping like {{'maskmix': 0.5}}, got {probs!r}")
        out: dict[str, float] = {}
        for key, v in probs.items():
            if key not in mixing_modes():
                raise ValueError(f"probs: unknown mode {key!r}; valid modes: "
                                 f"{', '.join(mixing_modes())}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"probs[{key!r}] must be in [0, 1], got {v!r}")
            out[key] = float(v)
        total = sum(out.values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"probs must sum to <= 1 (the rest is 'no mixing'), got {total:g}")
        return out

    @staticmethod
    def _check_partner(partner: Any) -> str | dict[str, str]:
        if isinstance(partner, Mapping):
            bad = [k for k in partner if k not in mixing_modes()]
            if bad:
                raise ValueError(f"partner: unknown mode {bad[0]!r}; valid modes: "
                                 f"{', '.join(mixing_modes())}")
            wrong = {k: v for k, v in partner.items() if v not in PARTNERS}
            if wrong:
                k, v = next(iter(wrong.items()))
                raise ValueError(f"partner[{k!r}] must be 'flip' or 'perm', got {v!r}")
            return {k: partner.get(k, "flip") for k in mixing_modes()}
        if partner not in PARTNERS:
            raise ValueError(f"partner must be 'flip' or 'perm' (or a mapping mode -> one of "
                             f"them), got {partner!r}")
        return partner

    def partner_for(self, mode: str) -> str:
        """The partner rule ("flip" | "perm") of mode `mode` ("none" and a per-mode mapping:
        "flip", nothing to draw)."""
        if isinstance(self.partner, str):
            return self.partner
        return self.partner.get(mode, "flip")

    # --- derived geometry -------------------------------------------------------------
    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) = (H/P, W/P), the model's token grid."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def cell_grid(self) -> tuple[int, int]:
        """Number of MaskMix cells per side, edge cells included (ceil division)."""
        k = self.mask_patch // self.patch_size
        h, w = self.token_grid
        return -(-h // k), -(-w // k)

    # --- construction -----------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MixConfig":
        """The preset of a registered method (`mixpro_dali.methods`) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MixConfig":
        """Build from a YAML mapping. Unknown keys are errors (hyphenated spellings included:
        TransMix's DeiT-S config silently lost a setting that way)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"mix config must be a mapping, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            hints = [
                f"{k!r} (did you mean {k.replace('-', '_')!r}?)"
                if isinstance(k, str) and k.replace("-", "_") in valid
                else repr(k)
                for k in unknown
            ]
            raise ValueError(
                f"unknown mix config key(s) {', '.join(hints)}; valid keys: {', '.join(valid)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/checkpoint friendly); round-trips through from_dict."""
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["probs"] = dict(self.probs)
        if not isinstance(self.partner, str):
            d["partner"] = dict(self.partner)
        return d
