"""Running several models over one dataset and keeping per-image results in dataset order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .device import autocast
from .distributed import all_gather_cat, all_gather_lists, is_distributed
from .metrics import TOPK, topk_correct
from .models import classifier_outputs


def features_and_logits(model: nn.Module, images: Tensor, probe: Optional[nn.Module] = None
                        ) -> tuple[Tensor, Optional[Tensor]]:
    """One forward pass: the pre-logit features (what enters the classifier) and logits.

    The features are tapped with a hook on the classifier rather than by calling
    ``forward_features`` so that whatever a patched model does in ``forward``
    still runs. Without a head (``num_classes=0``) the features are the output.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    captured: list[Tensor] = []
    handle = head.register_forward_hook(lambda m, a, o: captured.append(a[0])) if isinstance(head, nn.Module) else None
    try:
        output = model(images)
    finally:
        if handle is not None:
            handle.remove()
    features = captured[-1] if captured else output
    if probe is not None:
        return features, probe(features.to(probe.weight.dtype))
    return features, (output if classifier_outputs(model) else None)


@dataclass
class SampleResults:
    """Per-image results of several models over one dataset, in dataset order.

    ``features[m]``: [N, D] float32 pre-logit features of model m; ``correct[m]``:
    [N, len(ks)] top-k hits, or None when model m scores no classes;
    ``unreadable``: dataset positions of the images skipped because they could
    not be decoded (they are in no other field).
    """

    index: Tensor
    labels: Tensor
    features: list[Tensor]
    correct: list[Optional[Tensor]]
    unreadable: list[int] = field(default_factory=list)

    def accuracy(self, model: int) -> dict[str, Optional[float]]:
        """Top-1/top-5 in percent (None where not scored)."""
        hits = self.correct[model]
        scores = {f"top{k}": None for k in TOPK}
        if hits is not None:
            for column, k in enumerate(TOPK[:hits.shape[1]]):
                scores[f"top{k}"] = 100.0 * hits[:, column].double().mean().item()
        return scores


@torch.inference_mode()
def evaluate(models: Sequence[nn.Module], loader: DataLoader, device: torch.device,
             probe: Optional[nn.Module] = None, amp: str = "none", channels_last: bool = False,
             progress: Optional[Callable[[Any], Any]] = None) -> SampleResults:
    """Run every model on each batch (images are decoded once) and collect per-image results.

    Under torch.distributed every rank gets the gathered, de-duplicated results.
    Images the loader left out as unreadable (see ``data.make_loader``) are the
    positions its sampler gave and no batch held: they are listed in
    ``unreadable``, so the loader must not drop its last batch.
    """
    if loader.drop_last:
        raise ValueError("evaluate needs every image its sampler gives: use a loader with drop_last=False")
    probe = probe.to(device) if probe is not None else None
    index, labels = [], []
    features: list[list[Tensor]] = [[] for _ in models]
    correct: list[list[Tensor]] = [[] for _ in models]
    batches = progress(loader) if progress else loader
    for batch in batches:
        if batch is None:  # nothing in it could be decoded
            continue
        images, batch_labels, batch_index = batch
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for m, model in enumerate(models):
            with autocast(device, amp):
                feats, logits = features_and_logits(model, images, probe)
            features[m].append(feats.float().cpu())
            if logits is not None:
                correct[m].append(topk_correct(logits.float(), batch_labels).cpu())
        index.append(batch_index)
        labels.append(batch_labels)
    seen = set(torch.cat(index).tolist()) if index else set()
    unreadable = sorted(set(all_gather_lists([i for i in loader.sampler if i not in seen])))
    empty = [r for r, batches_read in enumerate(all_gather_lists([len(index)])) if not batches_read]
    if empty:
        raise ValueError(f"no image could be decoded{f' in the shard of rank(s) {empty}' if is_distributed() else ''}"
                         f": {len(unreadable)} of {len(loader.dataset)} images are unreadable")
    all_index = all_gather_cat(torch.cat(index), device)
    order = _first_occurrences(all_index)

    def ordered(parts: list[Tensor]) -> Optional[Tensor]:
        return all_gather_cat(torch.cat(parts), device)[order] if parts else None

    return SampleResults(index=all_index[order], labels=ordered(labels),
                         features=[ordered(f) for f in features], correct=[ordered(c) for c in correct],
                         unreadable=unreadable)


def _first_occurrences(index: Tensor) -> Tensor:
    """Positions that sort ``index`` ascending, keeping one entry per value (drops
    the samples DistributedSampler repeats to even out the shards)."""
    order = torch.argsort(index, stable=True)
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    return order[keep]
