"""python -m train [--config YAML|NAME] [--section.key value ...] [--resume PATH] [--output DIR]

No arguments: the embedded Fashion-MNIST demo (train/configs/demo_fashion_mnist.yaml).
Multi-GPU / multi-node: torchrun --nproc_per_node N -m train --config mixpro_deit_small ...
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import (CONFIG_DIR, TrainConfig, apply_overrides, load_yaml, parse_value,
                     resolve_config_path)

DEFAULT_CONFIG = "demo_fashion_mnist"

logger = logging.getLogger(__spec__.name)  # 'train.__main__' also under python -m (__name__ '__main__')


def _parser() -> argparse.ArgumentParser:
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a timm ViT with MixPro (MaskMix + PAL) on DALI pipelines.",
        epilog="Any config key can be overridden as --section.key value (sections: data, model, "
               "mix, optim, run), e.g. --optim.lr 5e-4 --model.kwargs.depth 6 "
               f"--mix.method transmix. Packaged configs: {presets}.")
    p.add_argument("--config", default=None,
                   help=f"YAML file or packaged config name (default: {DEFAULT_CONFIG}; with "
                        "--resume: the checkpoint's config)")
    p.add_argument("--resume", default=None, help="checkpoint .pth or run folder (its last.pth)")
    p.add_argument("--output", default=None, help="run folder (default: runs/<config>-<time>, "
                                                   "or the resumed run's folder)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    return p


def parse_overrides(rest: Sequence[str]) -> dict[str, Any]:
    """['--a.b', '1', '--c.d=x'] -> {'a.b': 1, 'c.d': 'x'} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise ValueError(f"unrecognized argument {tok!r}: overrides look like "
                             "--section.key value (see --help)")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ValueError(f"override {tok} needs a value")
            value = rest[i + 1]
            i += 1
        if key in out:
            raise ValueError(f"override --{key} given twice")
        out[key] = parse_value(value)
        i += 1
    return out


def resolve(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace, str]:
    """argv -> (config, args, run name). Raises ValueError/TypeError/FileNotFoundError."""
    args, rest = _parser().parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.config is None and args.resume:
        from .checkpoint import load_checkpoint
        base, name = load_checkpoint(args.resume, training=True)["config"], "resumed"
        if args.output is None:
            rp = Path(args.resume)
            args.output = str(rp if rp.is_dir() else rp.parent)
    else:
        path = resolve_config_path(args.config or DEFAULT_CONFIG)
        base, name = load_yaml(path), path.stem
    cfg = TrainConfig.from_dict(apply_overrides(base, overrides))
    return cfg, args, name


def _error(msg: str) -> None:
    """Under torchrun every rank fails the same way: only rank 0 reports it."""
    from .dist import env_rank
    if env_rank() == 0:
        logger.error(msg)


def main(argv: Sequence[str] | None = None) -> int:
    from .dist import env_rank
    from pipelines.logs import setup_logging
    try:
        setup_logging(env_rank())
        cfg, args, name = resolve(argv)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _error(f"python -m train: error: {e}")
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .engine import NonFiniteLossError
    from .main import run
    try:
        run(cfg, resume=args.resume, output=args.output, name=name)
    except NonFiniteLossError as e:
        _error(f"python -m train: stopped: {e}")
        return 1
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("MIXPRO_TRACEBACK"):
            raise
        _error(f"python -m train: error: {e}\n(set MIXPRO_TRACEBACK=1 for the traceback)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
