"""python -m train.export CKPT OUT.pth [--ema] [--drop-head]

Backbone weights in plain timm format (timm's key names, no wrapper prefixes, no optimizer):
    model = timm.create_model(name, num_classes=..., **kwargs)
    model.load_state_dict(torch.load("OUT.pth", weights_only=True))
--drop-head removes the classifier (head.*, head_dist.*) for detection / segmentation backbones
(load those with strict=False). CKPT may be a run folder (its best.pth, else last.pth).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.logs import setup_logging

from .checkpoint import export_backbone
from .dist import env_rank

logger = logging.getLogger(__spec__.name)  # 'train.export' also under python -m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[2])
    p.add_argument("checkpoint", help="a .pth written by python -m train, or a run folder")
    p.add_argument("out", help="output .pth (timm state dict)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--drop-head", action="store_true", help="leave out the classifier")
    args = p.parse_args(argv)
    ck = Path(args.checkpoint)
    if ck.is_dir():
        ck = ck / "best.pth" if (ck / "best.pth").is_file() else ck / "last.pth"
    try:
        setup_logging(env_rank())
        out = export_backbone(ck, args.out, ema=args.ema, drop_head=args.drop_head)
    except (FileNotFoundError, ValueError) as e:
        logger.error("python -m train.export: error: %s", e)
        return 2
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
