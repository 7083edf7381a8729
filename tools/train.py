#!/usr/bin/env python
"""Train an mmsegmentation / mmdetection config of configs/ with mmengine's Runner (as mmseg's
and mmdet's tools/train.py do), on CPU or GPU.

  python tools/make_synthetic_dense.py                      # the tiny set, /tmp/tokenreduce-synthetic
  python tools/train.py configs/segmentation/upernet_vit-s16-sfp_synthetic.py
  python tools/train.py configs/segmentation/upernet_vit-s16-sfp_ade20k.py --data-root /data/ADEChallengeData2016
  python tools/train.py CONFIG --work-dir DIR --cfg-options train_cfg.max_iters=100
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmengine.config import DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from models.mm_utils import load_config  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--data-root", type=Path, help="dataset folder (default: the config's, or $DATA_ROOT)")
    parser.add_argument("--work-dir", type=Path, help="logs and checkpoints (default work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries, key=value")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> Runner:
    """Train; returns the Runner (its message hub holds the losses)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.data_root, args.cfg_options)
    cfg.work_dir = str(args.work_dir or Path("work_dirs") / args.config.stem)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
