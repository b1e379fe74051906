"""The mixing methods: one row each. Everything that names a method derives from this table:
`MixConfig.preset` / `PRESETS`, the trainer's `mix.method` choices and its label recipe,
and the method lists of the benchmarks.

A row (`Method`) says what the operator draws and how the labels are made:
  probs          mode -> probability per batch (modes: the mode table of `mixpro_dali.masks`,
                 code, name, sampler and image apply of each; the rest of the mass is "none")
  partner        "flip" | "perm" | per-mode mapping (None: MixConfig's default, flip)
  rounding       MaskMix cell count, "floor" | "ceil" (None: MixConfig's default, floor)
  options        any other MixConfig field of the preset (beta, mixup_alpha, ...)
  label          the `mix_targets` rule: "area" (area / blend labels), "transmix" (attention
                 labels, TransMix), "mixpro" (PAL)
  label_modes    the modes whose rows get the attention label (None: the rule's own, CutMix
                 rows for transmix and MaskMix rows for mixpro)
  label_variant  "paper" | "official" (PAL: alpha detached + smoothing, or fistyee/MixPro's
                 alpha with gradient + hard labels in the PAL rows)
  variant_of     the method this row is a variant of (the trainer's deprecated
                 `mix.preset: official` picks the official variant of `mix.method`)

  name             probs                                  partner        labels
  none             -                                      -              area (one-hot)
  deit             Mixup 0.5 / CutMix 0.5                 flip           area / blend
  transmix         CutMix 0.5 / Mixup 0.5                 flip           TransMix on CutMix rows
  maskmix          MaskMix 1.0                            flip           area
  mixpro           MaskMix 0.5 / Mixup 0.5, floor         flip           PAL on MaskMix rows
  mixpro-official  MaskMix 0.5 / Mixup 0.25 / CutMix 0.25 perm on MaskMix PAL (official)
                   ceil (fistyee/MixPro)

Adding a method is one `register_method(Method(...))` (docs/extending.md has worked examples).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .labels import LABEL_RULES, LABEL_VARIANTS
from .masks import MODES, mixing_modes

__all__ = ["Method", "METHODS", "PRESETS", "PARTNERS", "register_method", "unregister_method",
           "get_method", "method_names", "base_methods", "resolve_method"]

PARTNERS = ("flip", "perm")


@dataclass(frozen=True)
class Method:
    """One mixing method (see the module docstring for the fields)."""

    name: str
    probs: Mapping[str, float]
    partner: str | Mapping[str, str] | None = None
    rounding: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = "area"
    label_modes: tuple[str, ...] | None = None
    label_variant: str = "paper"
    variant_of: str | None = None
    summary: str = ""

    @property
    def preset(self) -> dict[str, Any]:
        """The MixConfig fields of this method (`MixConfig.preset(name)`)."""
        d: dict[str, Any] = {"probs": dict(self.probs)}
        if self.rounding is not None:
            d["rounding"] = self.rounding
        if self.partner is not None:
            d["partner"] = (self.partner if isinstance(self.partner, str)
                            else dict(self.partner))
        return {**d, **dict(self.options)}

    @property
    def attention(self) -> bool:
        """Whether the labels need the model's class attention."""
        return LABEL_RULES[self.label] != ()

    @property
    def attention_modes(self) -> tuple[str, ...]:
        """The modes whose rows get the attention label."""
        return LABEL_RULES[self.label] if self.label_modes is None else tuple(self.label_modes)


METHODS: dict[str, Method] = {}
"""name -> Method, in registration order."""
PRESETS: dict[str, dict[str, Any]] = {}
"""name -> MixConfig fields of each method (a live view of METHODS)."""


def _check(m: Method) -> None:
    if not isinstance(m, Method):
        raise TypeError(f"register_method takes a Method, got {type(m).__name__}")
    if not isinstance(m.name, str) or not m.name or m.name in METHODS:
        raise ValueError(f"method name must be a new non-empty string, got {m.name!r}; "
                         f"registered: {', '.join(METHODS)}")
    bad = [k for k in m.probs if k not in mixing_modes()]
    if bad:
        raise ValueError(f"method {m.name!r}: probs has unknown mode {bad[0]!r}; modes: "
                         f"{', '.join(mixing_modes())} (add one with register_mode)")
    if m.label not in LABEL_RULES:
        raise ValueError(f"method {m.name!r}: label must be one of {tuple(LABEL_RULES)}, got "
                         f"{m.label!r}")
    wrong = [k for k in (m.label_modes or ()) if k not in MODES]
    if wrong:
        raise ValueError(f"method {m.name!r}: label_modes has unknown mode {wrong[0]!r}")
    if m.label_variant not in LABEL_VARIANTS:
        raise ValueError(f"method {m.name!r}: label_variant must be one of {LABEL_VARIANTS}, "
                         f"got {m.label_variant!r}")
    if m.variant_of is not None and m.variant_of not in METHODS:
        raise ValueError(f"method {m.name!r}: variant_of {m.variant_of!r} is not registered")


def register_method(method: Method) -> Method:
    """Add a method row (validated against the mode table and the label rules)."""
    _check(method)
    METHODS[method.name] = method
    PRESETS[method.name] = method.preset
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (the built-in ones stay)."""
    if name in _BUILTIN:
        raise ValueError(f"built-in method {name!r} cannot be removed")
    METHODS.pop(name, None)
    PRESETS.pop(name, None)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(METHODS)


def base_methods() -> tuple[str, ...]:
    """The methods that are not a variant of another (the trainer's study arms)."""
    return tuple(n for n, m in METHODS.items() if m.variant_of is None)


def resolve_method(method: str, variant: str | None = None) -> Method:
    """The row of `method`, or of its `variant` ("paper": the method itself, "official": the
    row whose variant_of is `method` with label_variant "official"), for the trainer's
    `mix.method` + `mix.label_variant`."""
    row = get_method(method)
    if variant is None or variant == row.label_variant:
        return row
    if variant not in LABEL_VARIANTS:
        raise ValueError(f"label_variant must be one of {LABEL_VARIANTS}, got {variant!r}")
    for m in METHODS.values():
        if m.variant_of == method and m.label_variant == variant:
            return m
    has = sorted({m.variant_of for m in METHODS.values()
                  if m.variant_of is not None and m.label_variant == variant})
    raise ValueError(f"label_variant={variant!r} applies to method="
                     f"{' | '.join(repr(h) for h in has)} only, got method={method!r}")


for _m in (
    Method("none", {}, summary="no mixing"),
    Method("deit", {"mixup": 0.5, "cutmix": 0.5}, summary="DeiT: Mixup / CutMix, switch 0.5"),
    Method("transmix", {"cutmix": 0.5, "mixup": 0.5}, label="transmix",
           summary="CutMix with TransMix attention labels / Mixup"),
    Method("maskmix", {"maskmix": 1.0}, summary="MaskMix with area labels (ablation)"),
    Method("mixpro", {"maskmix": 0.5, "mixup": 0.5}, partner="flip", rounding="floor",
           label="mixpro", summary="paper: MaskMix + PAL 0.5 / Mixup 0.5 (Table 6 best row)"),
    Method("mixpro-official", {"maskmix": 0.5, "mixup": 0.25, "cutmix": 0.25},
           partner={"maskmix": "perm", "mixup": "flip", "cutmix": "flip"}, rounding="ceil",
           label="mixpro", label_variant="official", variant_of="mixpro",
           summary="fistyee/MixPro parity: partner perm on MaskMix batches, flip on "
                   "Mixup / CutMix (timm's Mixup there), ceil, PAL official"),
):
    register_method(_m)
_BUILTIN = tuple(METHODS)
