#!/usr/bin/env python
"""Train an mmsegmentation / mmdetection config of configs/ with mmengine's Runner (as mmseg's
and mmdet's tools/train.py do), on CPU or GPU.

  python tools/make_synthetic_dense.py                      # the tiny set, /tmp/tokenreduce-synthetic
  python tools/train.py configs/segmentation/upernet_vit-s16-sfp_synthetic.py
  python tools/train.py configs/segmentation/upernet_vit-s16-sfp_ade20k.py --data-root /data/ADEChallengeData2016
  python tools/train.py CONFIG --work-dir DIR --cfg-options train_cfg.max_iters=100
  python tools/train.py configs/segmentation/upernet_vit-s16-sfp_synthetic_dtop-heads.py \
      --load-from work_dirs/upernet_vit-s16-sfp_synthetic/iter_40.pth    # DToP step 2 from step 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from models.mm_utils import checkpoint_state_dict, load_config  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--data-root", type=Path, help="dataset folder (default: the config's, or $DATA_ROOT)")
    parser.add_argument("--work-dir", type=Path, help="logs and checkpoints (default work_dirs/<config name>)")
    parser.add_argument("--load-from", type=Path, help="start from this checkpoint's weights (e.g. the baseline's, "
                        "for DToP's fine-tuning with exit heads: modules it lacks keep their initialisation)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries, key=value")
    args = parser.parse_args(argv)
    if args.load_from is not None and not args.load_from.is_file():
        parser.error(f"--load-from {args.load_from} does not exist")
    return args


def weights_only_copy(checkpoint: Path, work_dir: Path) -> Path:
    """``checkpoint``'s weights alone (``mm_utils.checkpoint_state_dict``), saved in ``work_dir`` for
    mmengine's ``load_from``, which loads them non-strictly after initialising the model and
    whose own loading fails on an mmengine checkpoint under torch >= 2.6."""
    work_dir.mkdir(parents=True, exist_ok=True)
    copy = work_dir / f"load_from_{checkpoint.stem}.pth"
    torch.save({"state_dict": checkpoint_state_dict(checkpoint)}, copy)
    return copy


def main(argv: Optional[list[str]] = None) -> Runner:
    """Train; returns the Runner (its message hub holds the losses)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.data_root, args.cfg_options)
    cfg.work_dir = str(args.work_dir or Path("work_dirs") / args.config.stem)
    if args.load_from is not None:
        cfg.load_from = str(weights_only_copy(args.load_from, Path(cfg.work_dir)))
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
