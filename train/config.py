"""TrainConfig: every knob of `python -m train`, as frozen dataclasses validated on construction.

YAML (train/configs/*.yaml) -> `TrainConfig.from_dict`; `--section.key value` CLI overrides go
through `apply_overrides`. Unknown and duplicate keys are errors that list the valid keys (the
TransMix DeiT-S config lost a setting to a silently ignored hyphenated key). Values are
type-checked against the field annotations; "1e-3" from YAML/CLI is accepted for float fields.
The resolved config is written next to every run (`config.yaml`) and stored as a plain dict in
checkpoints.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from mixpro_dali.methods import base_methods, resolve_method
from pipelines.options import DataOptions

__all__ = ["DataConfig", "ModelConfig", "MixSection", "OptimConfig", "RunConfig", "TrainConfig",
           "METHODS", "load_yaml", "apply_overrides", "resolve_config_path", "CONFIG_DIR",
           "RENAMED_KEYS", "DeprecatedConfigKey"]

CONFIG_DIR = Path(__file__).parent / "configs"


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # mix.method's choices: the registry's methods (mixpro_dali.methods)
        return base_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check(cond: bool, name: str, value: Any, valid: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


@dataclass(frozen=True)
class DataConfig(DataOptions):
    """Sources, batching and the data options. train/val: class-folder root, file list or
    WebDataset shards. demo: with train/val unset, use the embedded Fashion-MNIST (prepared once
    into cache_dir). The augmentation and decode keys (image_size, auto_augment, re_prob,
    interpolation, scale, ratio, hflip, crop_pct, mean, std, hw_decoder_load, initial_fill) are
    `pipelines.options.DataOptions`, declared and validated there; `data_options()` gives them
    to the loaders whole. image_size is a single int here (square images)."""

    demo: bool = False
    train: Union[str, None] = None
    val: Union[str, None] = None
    batch_size: int = 128            # per rank (per GPU)
    val_batch_size: Union[int, None] = None  # None: 2 x batch_size
    num_threads: int = 4             # DALI CPU threads per rank
    cache_dir: Union[str, None] = None     # demo cache; None: $MIXPRO_DALI_CACHE or ~/.cache
    demo_train_size: int = 20000
    demo_val_size: int = 5000
    demo_raw_dir: Union[str, None] = None  # folder with the four Fashion-MNIST .gz files
    exclude: Union[str, None] = None       # list of bad files (python -m pipelines.scan ROOT -o)

    _prefix = "data."

    def __post_init__(self) -> None:
        if (self.train is None) != (self.val is None):
            missing = "data.val" if self.val is None else "data.train"
            raise ValueError(f"{missing} is missing: give both data.train and data.val "
                             "(or neither, with data.demo true, for the embedded Fashion-MNIST)")
        if self.train is None and not self.demo:
            raise ValueError("no dataset: set --data.train DIR --data.val DIR (class folders, "
                             "file list or WebDataset shards), or --data.demo true for the "
                             "embedded Fashion-MNIST demo")
        _check(isinstance(self.image_size, int) and self.image_size > 0, "data.image_size",
               self.image_size, "a positive int")
        for name in ("batch_size", "num_threads", "demo_train_size", "demo_val_size"):
            v = getattr(self, name)
            _check(v > 0, f"data.{name}", v, "a positive int")
        if self.val_batch_size is not None:
            _check(self.val_batch_size > 0, "data.val_batch_size", self.val_batch_size,
                   "a positive int or null")
        super().__post_init__()

    @property
    def use_demo(self) -> bool:
        return self.train is None and self.demo


@dataclass(frozen=True)
class ModelConfig:
    """A timm model by name; `kwargs` go to timm.create_model (img_size, patch_size, embed_dim,
    depth, num_heads, ...) for small variants."""

    name: str = "deit_tiny_patch16_224"
    num_classes: int = 1000
    drop_path: float = 0.1
    drop: float = 0.0
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.num_classes > 1, "model.num_classes", self.num_classes, "an int >= 2")
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", self.drop_path, "in [0, 1)")
        _check(0.0 <= self.drop < 1.0, "model.drop", self.drop, "in [0, 1)")
        reserved = {"num_classes", "drop_path_rate", "drop_rate", "pretrained"} & set(self.kwargs)
        _check(not reserved, "model.kwargs", dict(self.kwargs),
               f"free of {sorted(reserved)} (use model.num_classes / drop_path / drop)")


@dataclass(frozen=True)
class MixSection:
    """Mixing method and label recipe. method -> MixConfig preset and mix_targets method:
    none/deit/maskmix -> area labels; transmix -> TransMix labels; mixpro -> PAL.
    label_variant: 'paper' or 'official' (fistyee/MixPro parity; mixpro only; the old key
    `mix.preset` still works and warns). `options` override MixConfig fields (probs, beta,
    mixup_alpha, cutmix_alpha, rounding, partner, ...)."""

    method: str = "mixpro"
    label_variant: str = "paper"
    mask_patch: int = 64
    smoothing: float = 0.1
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.method in base_methods(), "mix.method", self.method,
               f"one of {base_methods()}")
        _check(self.label_variant in ("paper", "official"), "mix.label_variant",
               self.label_variant, "'paper' or 'official'")
        _check(self.mask_patch > 0, "mix.mask_patch", self.mask_patch, "a positive int")
        _check(0.0 <= self.smoothing < 1.0, "mix.smoothing", self.smoothing, "in [0, 1)")
        bad = {"image_size", "patch_size", "mask_patch", "seed"} & set(self.options)
        _check(not bad, "mix.options", dict(self.options),
               f"free of {sorted(bad)} (set from data/model/mix/run)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine in steps. lr is for a global batch of `lr_base_batch` and scaled linearly
    (global batch = batch_size x world size x accum_steps); lr_base_batch null = lr as is."""

    opt: str = "adamw"
    lr: float = 1e-3
    lr_base_batch: Union[int, None] = 1024
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Union[float, None] = None
    accum_steps: int = 1
    sched: str = "cosine"
    warmup_epochs: float = 20.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "positive")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(self.accum_steps >= 1, "optim.accum_steps", self.accum_steps, "an int >= 1")
        _check(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", self.clip_grad,
               "positive or null")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(self.lr_base_batch is None or self.lr_base_batch > 0, "optim.lr_base_batch",
               self.lr_base_batch, "a positive int or null")
        _check(self.sched in ("cosine", "step", "constant"), "optim.sched", self.sched,
               "'cosine', 'step' or 'constant'")


@dataclass(frozen=True)
class RunConfig:
    """Loop, precision, checkpoints and logging. amp: 'bf16' | 'fp16' | 'none' (GPU only; CPU
    runs in float32). ckpt_every: also keep epoch_NNNN.pth every N epochs (0: never);
    ckpt_steps: refresh last.pth every N optimizer steps mid-epoch (0: at epoch ends only)."""

    epochs: int = 300
    seed: int = 0
    device: str = "auto"
    amp: str = "bf16"
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.99996
    output: Union[str, None] = None
    ckpt_every: int = 0
    ckpt_steps: int = 0
    log_every: int = 50
    tensorboard: bool = True
    progress: str = "auto"

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "run.epochs", self.epochs, "an int >= 1")
        _check(self.seed >= 0, "run.seed", self.seed, "a non-negative int")
        _check(self.device in ("auto", "cpu", "cuda"), "run.device", self.device,
               "'auto', 'cpu' or 'cuda'")
        _check(self.amp in ("bf16", "fp16", "none"), "run.amp", self.amp,
               "'bf16', 'fp16' or 'none'")
        _check(0.0 < self.ema_decay < 1.0, "run.ema_decay", self.ema_decay, "in (0, 1)")
        for name in ("ckpt_every", "ckpt_steps"):
            _check(getattr(self, name) >= 0, f"run.{name}", getattr(self, name), ">= 0")
        _check(self.log_every >= 1, "run.log_every", self.log_every, "an int >= 1")
        _check(self.progress in ("auto", "bar", "lines", "off"), "run.progress", self.progress,
               "'auto', 'bar', 'lines' or 'off'")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "mix": MixSection, "optim": OptimConfig,
            "run": RunConfig}


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mix: MixSection = field(default_factory=MixSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        try:  # 'official': the method's official variant in the registry
            resolve_method(self.mix.method, self.mix.label_variant)
        except ValueError as e:  # the registry's message, with train's key names
            msg = str(e).replace("method=", "mix.method=")
            raise ValueError(f"mix.{msg}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"config must be a mapping of sections, got {type(d).__name__}")
        _reject_unknown(d, SECTIONS, "config section")
        return cls(**{k: _build(SECTIONS[k], v, k) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of builtins (YAML / torch.load(weights_only=True) friendly)."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}


# --- renamed keys ------------------------------------------------------------------------------
# section -> {old key: new key}. The old key is still read from YAML, CLI overrides and the
# config stored in older checkpoints (resume), with a DeprecatedConfigKey warning.
# mix.preset -> mix.label_variant: "preset" also names MixConfig.preset(...) and the registry's
# presets; this key only picks the label/partner variant.
RENAMED_KEYS: dict[str, dict[str, str]] = {"mix": {"preset": "label_variant"}}


class DeprecatedConfigKey(DeprecationWarning):
    """A config key given by its old name (RENAMED_KEYS)."""


warnings.filterwarnings("default", category=DeprecatedConfigKey)  # shown to CLI users too


def _renamed(section: str, d: Mapping[str, Any]) -> dict[str, Any]:
    """d with old key names replaced by the new ones (warns); an old and a new name with
    different values is a ValueError naming both."""
    renames = RENAMED_KEYS.get(section, {})
    out: dict[str, Any] = {}
    for k, v in d.items():
        new = renames.get(k, k)
        if new != k:
            warnings.warn(f"{section}.{k} is deprecated: use {section}.{new} (same values)",
                          DeprecatedConfigKey, stacklevel=2)
        if new in out and out[new] != v:
            old = k if new != k else next(o for o, n in renames.items() if n == k and o in d)
            raise ValueError(f"{section}.{old}={d[old]!r} and {section}.{new}={d[new]!r} "
                             f"disagree: {section}.{old} is the deprecated name of "
                             f"{section}.{new}; give {section}.{new} only")
        out[new] = v
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _reject_unknown(d: Mapping, valid: Any, what: str) -> None:
    valid = list(valid)
    for k in d:
        if k not in valid:
            close = difflib.get_close_matches(str(k).replace("-", "_"), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what} {k!r}{hint}; valid: {', '.join(valid)}")


def _build(cls: type, d: Any, section: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise TypeError(f"config section {section!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    d = _renamed(section, d)
    _reject_unknown(d, hints, f"key in section {section!r}")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in d.items()})


def _coerce(v: Any, tp: Any, name: str) -> Any:
    """Check v against annotation tp; accept '1e-3' for float and lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(v, a, name)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if errors else f"{name}: bad value {v!r}")
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise TypeError(f"{name} must be a list of {len(args)} values, got {v!r}")
        return tuple(_coerce(x, a, name) for x, a in zip(v, args))
    if tp is bool:
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a string, got {v!r}")
        return v
    if tp is dict or origin is dict:
        if not isinstance(v, Mapping):
            raise TypeError(f"{name} must be a mapping, got {v!r}")
        return dict(v)
    raise TypeError(f"{name}: unsupported annotation {tp!r}")  # pragma: no cover


# --- YAML with duplicate-key detection ---------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are bools, so `--run.progress off`
    or `progress: off` stays the string 'off' (YAML 1.1 reads on/off/yes/no as bools, and a
    str field then refused a valid choice); a bool field given 'yes' is refused by name."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in config (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def parse_value(text: str) -> Any:
    """A CLI value as YAML ('3' -> 3, 'null' -> None, '[0.5, 1]' -> list, '1e-3' stays str)."""
    return yaml.load(text, Loader=_StrictLoader)


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or a packaged preset name ('mixpro_deit_tiny' -> train/configs/...)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = CONFIG_DIR / (p.name if p.suffix == ".yaml" else p.name + ".yaml")
    if packaged.is_file():
        return packaged
    presets = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"--config {str(name)!r}: no such file and no packaged config of "
                            f"that name; packaged configs: {presets}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        d = yaml.load(f, Loader=_StrictLoader)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections, got {type(d).__name__}")
    return d


def apply_overrides(d: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set 'section.key[.sub]' = value in a nested dict (copy). Keys are checked later by
    TrainConfig.from_dict, except that a misspelled section or key fails here with the list.
    An old key name (RENAMED_KEYS) is set under its new name, replacing either name in d."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}
    for dotted, value in _renamed_overrides(overrides).items():
        parts = dotted.split(".")
        hints = typing.get_type_hints(SECTIONS[parts[0]])
        _reject_unknown({parts[1]: 0}, hints, f"key in section {parts[0]!r}")
        if out.get(parts[0]) is None:
            out[parts[0]] = {}
        node = out[parts[0]]
        if not isinstance(node, dict):
            raise TypeError(f"config section {parts[0]!r} must be a mapping, got {node!r}")
        for old, new in RENAMED_KEYS.get(parts[0], {}).items():
            if new == parts[1]:  # the override replaces the old name in the YAML/checkpoint
                node.pop(old, None)
        for p in parts[1:-1]:
            if p not in node or node[p] is None:
                node[p] = {}
            elif not isinstance(node[p], dict):
                raise ValueError(f"override --{dotted}: {p!r} is not a mapping")
            node[p] = dict(node[p])
            node = node[p]
        node[parts[-1]] = value
    return out


def _renamed_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides with sections checked and old key names renamed (two names, two values:
    ValueError)."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) < 2:
            raise ValueError(f"override --{dotted}: use --section.key, sections: "
                             f"{', '.join(SECTIONS)}")
        _reject_unknown({parts[0]: 0}, SECTIONS, "config section")
        by_section.setdefault(parts[0], {})[".".join(parts[1:])] = value
    return {f"{section}.{k}": v for section, keys in by_section.items()
            for k, v in _renamed(section, keys).items()}


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
