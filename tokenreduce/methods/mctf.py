"""MCTF: Multi-criteria Token Fusion with One-step-ahead Attention (Lee, Choi,
Kim, CVPR 2024, arXiv 2403.10030; official code github.com/mlvlab/MCTF).

Facts followed from the official code (read at commit 2004da0):

* The reduction happens at the *start* of the block: the metric is the block
  input x (residual stream before LayerNorm), with ToMe's alternating A/B split
  (A = even positions, B = odd positions).
* Score W = W_sim · W_info · W_size over A×B, with
  W_sim = ((cos + 1) / 2)^(1/τ_sim),
  W_info = (ĩ_a · ĩ_b)^(1/τ_info), ĩ = 1 / (attention the token receives, mean
  over heads and queries), divided by its per-sample max,
  W_size = (ŝ_a · ŝ_b)^(1/τ_size), ŝ = 1 / size divided by its per-sample max.
  The code's τ are the reciprocals of the exponents, and its evaluation setting
  is τ_sim=1, τ_info=20, τ_size=40 (``mctf_type [.., 1, 20, 40, ..]``): these are
  the defaults here. τ = 0 switches a criterion off, as in the code.
  Scores are computed without gradient.
* Bidirectional matching: r1 = r // 2 A tokens (best score to B first) merge
  into their best B token; then r2 = r − r1 B tokens merge into their best
  *unmerged* A token, reusing the same (transposed) scores. A B token that just
  received A tokens may itself move in the second step, taking them along.
  Output order: prefix tokens, unmerged A in position order, then unmerged B in
  decreasing order of their best second-step score (the code's
  ``cat([dst2, unm2])``); the order matters because the next block splits by
  position.
* Merged features are a weighted mean with weights a·s (a = attention the token
  receives, averaged over heads and queries; s = size): the code's
  ``pooling_type=1``, which is the *merge* pooling (its division by the
  per-sample max size cancels in the mean and is left out). Sizes add. The
  weights carry no gradient (the code computes them under ``no_grad``).
  ``pooling="size"`` gives the code's ``pooling_type=0`` (size-weighted mean).
* One-step-ahead attention (``one_step_ahead=True``, the code's mode 1): this
  block's attention is computed on the unmerged tokens (proportional attention
  with the current sizes), used for W_info and the merge weights, then merged —
  key columns summed, query rows averaged with the same a·s weights as the
  tokens — and applied to v of LayerNorm(merged x). The adapter computes this as
  P · spread(v') followed by the row combination (``Reduction.spread``,
  ``reduction.merge_attention`` is the same map written out), and P · spread(v')
  is attention over the unmerged keys with values spread(v'): fused attention
  (SDPA, log-size bias) gives it without forming P; the official code scatters
  the whole H×N×N map twice. ``one_step_ahead=False`` is the code's "precise"
  mode 2: the attention received (without gradient) only chooses the merge, and
  attention is recomputed on the merged tokens (SDPA, proportional).
* What the criteria read of this block's attention is only the attention each
  token receives (``Need.RECEIVED_ATTENTION``): the adapter sums softmax rows
  over chunks of queries, so no B·H·N² map is ever held (memory O(chunk·N));
  the price is one more q·kᵀ per merging block, since the map is not kept for
  the attention output.
* Caps: with an integer r, r ≤ T − 10 (T tokens including prefix); r < 1 is a
  fraction of the T − prefix tokens (int, floored); then r ≤ (T − prefix) // 2.
* Schedules: default r=16 at every block but the first (blocks 1–11 of a
  12-block ViT, ``--activate_layer [1..11]``); "MCTF-fast" is
  ``r=0.35, locations=(3, 6, 9)``.
* The official model's head reads the class token (``head(x[:, 0])``): there is
  no size- or attention-weighted pooling at the head, so the timm head is left
  as is (avg-pool models get the adapter's size-weighted mean).
* Training: :func:`consistency_loss` — the official fine-tuning loss
  (``--task_type [1,1,0.4] --task_weight [1,1,3]``): cross-entropy of the
  student (MCTF at r) + cross-entropy of a "teacher" pass of the same weights at
  a random r_t ∈ [0, r_teacher_max) (gradients flow through both) + 3 × the
  mean squared difference between the teacher's detached and the student's
  final class token (after the final norm), averaged over the samples whose
  student probability of the label exceeds 0.4.

Differences from the official code (none changes the evaluation setting on a
class-token ViT): prefix tokens other than the class token (distillation,
registers) are protected both as sources and as destinations and kept in front;
with no class token the unmerged A tokens stay in position order; the 10-token
floor also applies to fractional r; scores are computed in float32, the cosine
as a·bᵀ / (|a||b|), and W_info · W_size as the product of one factor per token,
(ĩ_a^(1/τ_info) ŝ_a^(1/τ_size)) · (ĩ_b^(1/τ_info) ŝ_b^(1/τ_size)) (float rounding
only); attention dropout, if any, is applied to the unmerged map (the code
drops on the merged one). The code's mode 0
(reduction after the MLP with the block's attention) is not provided.
Checked against the official code on random-init DeiT-S/T with identical
weights: logits agree to ~1.5e-6 (one-step-ahead and precise, r=16 and fast),
except where a score tie within one float ulp flips a choice.
Reported: DeiT-T 72.2 → 72.7 top-1 at 0.71 GFLOPs, DeiT-S 79.8 → 80.1 at 2.60
GFLOPs after 30 epochs of fine-tuning; accuracy not reproduced here. Our
count_flops gives 2.687 for DeiT-S r=16 (the official model under fvcore: 2.60):
P · spread(v') multiplies over N keys instead of the merged M (+0.015), and the
received attention costs one more q·kᵀ over the N tokens entering each merging
block (+0.070: H·D multiply-adds per pair of tokens), work the official code
(and this one before the N×N map was dropped: 2.617) does not repeat because it
keeps the map. MCTF-fast: 2.795 (paper 2.76). At 512 px (ViT-S/16, r=84) the
extra pass is 19.4 against 17.5 GFLOPs, and the peak memory of a forward falls
from 2.1x to below the unreduced model's.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..merging import alternating_split_order, forbid_across_groups, merge_by_destination, protect_prefix, unmatched
from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_blocks, check_range, register_method

Number = Union[int, float]
POOLINGS = ("attention", "size")


@dataclass
class MCTFOptions(Options):
    r: Number = 16  # int: tokens per block; float in (0, 1): fraction of the non-prefix tokens
    locations: Optional[tuple] = None  # None: every block but the first
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    one_step_ahead: bool = True
    pooling: str = "attention"
    prop_attn: bool = True

    def validate(self, num_blocks: int) -> None:
        validate_r("r", self.r)
        if self.locations is not None:
            self.locations = check_blocks("locations", self.locations, num_blocks)
        for name in ("tau_sim", "tau_info", "tau_size"):
            check_range(name, getattr(self, name), 0.0, math.inf)
        for flag in ("bidirectional", "one_step_ahead", "prop_attn"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} must be one of {POOLINGS}")


def validate_r(name: str, r: Number) -> None:
    """r is a token count (int ≥ 0) or a fraction (float in [0, 1))."""
    if isinstance(r, float):
        check_range(name, r, 0.0, 1.0, high_open=True)
    else:
        check_range(name, r, 0, math.inf, kinds=(int,))


def resolve_r(r: Number, num_tokens: int, num_prefix_tokens: int) -> int:
    """Tokens to merge at a block of ``num_tokens`` tokens (the official caps)."""
    candidates = num_tokens - num_prefix_tokens
    count = int(candidates * r) if r < 1 else int(r)
    return max(0, min(count, num_tokens - 10, candidates // 2))


def mctf_scores(
    metric: Tensor,
    received: Optional[Tensor],
    sizes: Optional[Tensor],
    num_prefix_tokens: int,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    groups: Optional[Tensor] = None,
) -> Tensor:
    """Multi-criteria score W [B, N_A, N_B] between A (even) and B (odd) tokens.

    ``metric`` [B, N, C] (block input), ``received`` [B, H, N] the attention each
    token receives in each head (mean over the queries; ``Need.RECEIVED_ATTENTION``)
    or None, ``sizes`` [B, N, 1] or None. Prefix tokens get −inf (never merged), and
    so do pairs of different ``groups`` labels [B, N].
    """
    received = None if received is None else received_over_heads(received)
    return _scores(metric, received, sizes, num_prefix_tokens, tau_sim, tau_info, tau_size, groups)


def _scores(metric: Tensor, received: Optional[Tensor], sizes: Optional[Tensor], num_prefix_tokens: int,
            tau_sim: float, tau_info: float, tau_size: float, groups: Optional[Tensor] = None) -> Tensor:
    with torch.no_grad(), torch.autocast(metric.device.type, enabled=False):
        metric = metric.detach().float()
        a, b = metric[:, ::2], metric[:, 1::2]
        if tau_sim > 0:
            # cosine as a·bᵀ / (|a| |b|): normalises N_A×N_B scores, not N×C features
            norm = metric.norm(dim=-1)
            scores = (a @ b.transpose(1, 2)).div_(norm[:, ::2, None] * norm[:, None, 1::2])
            scores = scores.add_(1).div_(2).clamp_min_(0)
            if tau_sim != 1:
                scores = scores.pow_(1 / tau_sim)
        else:
            scores = metric.new_ones(metric.shape[0], a.shape[1], b.shape[1])
        # W_info · W_size = w_a · w_b with one factor per token: powers of N values, not of N_A×N_B
        weight = None
        if tau_info > 0 and received is not None:
            weight = _token_weight(1 / received.clamp_min(1e-30), tau_info)
        if tau_size > 0 and sizes is not None:
            size_weight = _token_weight(1 / sizes[..., 0].float(), tau_size)
            weight = size_weight if weight is None else weight * size_weight
        if weight is not None:
            scores = scores.mul_(weight[:, ::2, None]).mul_(weight[:, None, 1::2])
        return forbid_across_groups(protect_prefix(scores, num_prefix_tokens), groups)


def received_over_heads(received: Tensor) -> Tensor:
    """Attention each token receives [B, N]: per-head received attention [B, H, N]
    (mean over the queries) averaged over the heads, float32."""
    return received.detach().float().mean(dim=1)


def _token_weight(value: Tensor, tau: float) -> Tensor:
    """v̂^(1/τ) with v̂ = v / per-sample max [B, N]: the pair weight (v̂_a · v̂_b)^(1/τ)
    is the product of the two tokens' weights."""
    return (value / value.amax(dim=1, keepdim=True)) ** (1 / tau)


def bidirectional_matching(
    scores: Tensor, r: int, num_tokens: int, num_prefix_tokens: int, bidirectional: bool = True,
    groups: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """MCTF's two-way bipartite matching on scores [B, N_A, N_B].

    Returns ``destination`` [B, N] (the token each token ends in), ``merged``
    [B, N] (the r tokens that disappear), ``order`` [B, N] (output order of
    the survivors) and ``set_aside`` (None without ``groups``; else [B, N]: the
    disappearing tokens whose chosen match had no partner in their group, with
    the A tokens that had merged into such a B token), for
    :func:`~tokenreduce.merging.merge_by_destination`.
    """
    batch, num_a, num_b = scores.shape
    device = scores.device
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    position = torch.arange(num_tokens, device=device)
    destination = position.repeat(batch, 1)
    merged = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    best, best_b = scores.max(dim=-1)
    sources = best.argsort(dim=-1, descending=True)[:, :r1]
    targets = best_b.gather(1, sources)
    set_aside = None if groups is None else torch.zeros_like(merged)
    if set_aside is not None:
        set_aside.scatter_(1, 2 * sources, unmatched(best.gather(1, sources), groups))
    if r2 > 0:
        # B → unmerged A, on the same scores with the merged A rows removed.
        remaining = scores.scatter(1, sources.unsqueeze(-1).expand(-1, -1, num_b), -math.inf)
        best2, best_a = remaining.max(dim=1)
        edges2 = best2.sort(dim=-1, descending=True).indices
        sources2 = edges2[:, :r2]
        destination.scatter_(1, 2 * sources2 + 1, 2 * best_a.gather(1, sources2))
        merged.scatter_(1, 2 * sources2 + 1, torch.ones_like(sources2, dtype=torch.bool))
        if set_aside is not None:
            set_aside.scatter_(1, 2 * sources2 + 1, unmatched(best2.gather(1, sources2), groups))
        # Output order: prefix, A by position, B by decreasing second-step score.
        # (sort keys built without writing into views, which the TorchScript ONNX exporter
        # traces with the batch size as a constant)
        second_rank = 2 * num_tokens + torch.arange(num_b, device=device).expand(batch, -1)
        key = position.expand(batch, -1).scatter(1, 2 * edges2 + 1, second_rank)
        key = torch.where(position < num_prefix_tokens, position - num_tokens, key)
        order = key.argsort(dim=1)
    else:
        order = alternating_split_order(num_tokens, num_prefix_tokens, device).expand(batch, -1)
    # A sources follow their B target, which may itself have moved in the second step
    # (or been set aside: then they are set aside with it, never mixed across groups).
    destination.scatter_(1, 2 * sources, destination.gather(1, 2 * targets + 1))
    merged.scatter_(1, 2 * sources, torch.ones_like(sources, dtype=torch.bool))
    if set_aside is not None:
        followers = set_aside.gather(1, 2 * sources) | set_aside.gather(1, 2 * targets + 1)
        set_aside.scatter_(1, 2 * sources, followers)
    return destination, merged, order, set_aside


def mctf_reduction(
    x: Tensor,
    received: Optional[Tensor],
    sizes: Optional[Tensor],
    r: int,
    num_prefix_tokens: int,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    bidirectional: bool = True,
    pooling: str = "attention",
    groups: Optional[Tensor] = None,
) -> Reduction:
    """The MCTF reduction of the block input ``x`` [B, N, C] merging r tokens
    (only inside ``groups`` labels [B, N] when given); ``received`` [B, H, N] as
    for :func:`mctf_scores`."""
    num_tokens = x.shape[1]
    received = None if received is None else received_over_heads(received)
    scores = _scores(x, received, sizes, num_prefix_tokens, tau_sim, tau_info, tau_size, groups)
    destination, merged, order, set_aside = bidirectional_matching(
        scores, r, num_tokens, num_prefix_tokens, bidirectional, groups)
    reduction = merge_by_destination(destination, merged, order, num_tokens - r, set_aside)
    if pooling == "size" or received is None:
        return reduction
    weight = received
    if sizes is not None:
        weight = weight * sizes[..., 0].float()
    if reduction.mass is not None:
        weight = weight * reduction.mass
    total = weight.new_zeros(weight.shape[0], reduction.num_out).scatter_add_(1, reduction.out_index, weight)
    weight = weight / total.gather(1, reduction.out_index)
    return Reduction.sparse(reduction.out_index, reduction.num_out, weight=weight, mass=reduction.mass)


@register_method
class MCTF(Method):
    """Multi-criteria (similarity, informativeness, size) bidirectional token
    fusion at the start of each block, with one-step-ahead attention."""

    name = "mctf"
    Options = MCTFOptions
    stage = "before_attention"
    respects_groups = True

    def __init__(self, options: MCTFOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        locations = options.locations if options.locations is not None else range(1, num_blocks)
        self.locations = frozenset(locations)
        self.r: Number = options.r

    def needs(self, block: int) -> Need:
        return Need.RECEIVED_ATTENTION if block in self.locations and self.options.r > 0 else Need.NOTHING

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        r = resolve_r(self.r, inputs.x.shape[1], self.num_prefix_tokens)
        if r <= 0:
            return None
        o = self.options
        return mctf_reduction(inputs.x, inputs.received_attention, inputs.sizes, r, self.num_prefix_tokens,
                              o.tau_sim, o.tau_info, o.tau_size, o.bidirectional, o.pooling, inputs.groups)

    @contextlib.contextmanager
    def reducing_by(self, r: Number) -> Iterator[None]:
        """Run forwards with another r at the same blocks (the consistency
        loss's teacher pass); r=0 runs the blocks unreduced."""
        validate_r("r", r)
        previous, self.r = self.r, r
        try:
            yield
        finally:
            self.r = previous


def sample_teacher_r(r_teacher_max: Number, generator: Optional[torch.Generator] = None) -> Number:
    """The official teacher r: uniform integer in [0, max) for an int max, or a
    multiple of 0.01 in [0, max) for a fractional max; 0 when max is 0."""
    if not r_teacher_max:
        return 0
    if r_teacher_max < 1:
        return int(torch.randint(0, int(r_teacher_max * 100), (1,), generator=generator)) / 100
    return int(torch.randint(0, int(r_teacher_max), (1,), generator=generator))


def consistency_loss(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    labels: Optional[Union[Tensor, Sequence[Tensor]]] = None,
    criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    r_teacher_max: Number = 8,
    threshold: float = 0.4,
    weights: Sequence[float] = (1.0, 1.0, 3.0),
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """MCTF's fine-tuning loss for a model with ``apply(model, "mctf", ...)``.

    Terms (official ``task_type [1, 1, 0.4]``, ``task_weight [1, 1, 3]``):
    ``student`` = criterion(logits at the model's r, targets); ``teacher`` =
    criterion(logits of the same weights at a random r_t in [0, r_teacher_max),
    targets); ``consistency`` = mean over features of (teacher's detached final
    class token − student's)², averaged over the samples whose student
    probability of their label exceeds ``threshold``. ``loss`` is the weighted sum.

    ``targets`` are class indices or soft targets (mixup); ``criterion``
    defaults to cross-entropy. ``labels`` are the class indices for the
    confidence (default: ``targets``); with mixup pass both mixed labels, e.g.
    ``(y, y.flip(0))``: the confidence is the sum of their probabilities, as in
    the official code. The "class token" is what the head reads before the
    classifier (``forward_head(pre_logits=True)``: the class token for DeiT).
    """
    from ..api import applied_method

    method = applied_method(model)
    if not isinstance(method, MCTF):
        raise ValueError(f"consistency_loss needs a model with MCTF applied, got {method!r}")
    if len(weights) != 3:
        raise ValueError(f"weights={tuple(weights)!r} must be three numbers (student, teacher, consistency)")
    validate_r("r_teacher_max", r_teacher_max)
    criterion = F.cross_entropy if criterion is None else criterion
    if labels is None:
        if targets.dtype.is_floating_point:
            raise ValueError("soft targets need labels=... (class indices) for the confidence")
        labels = targets
    labels = [labels] if isinstance(labels, Tensor) else list(labels)

    def run() -> tuple[Tensor, Tensor]:
        features = model.forward_features(images)
        return model.forward_head(features), model.forward_head(features, pre_logits=True)

    with method.reducing_by(sample_teacher_r(r_teacher_max, generator)):
        teacher_logits, teacher_token = run()
    student_logits, student_token = run()
    probs = student_logits.detach().softmax(dim=-1)
    confidence = sum(probs.gather(1, label.view(-1, 1))[:, 0] for label in labels)
    passed = (confidence > threshold).to(student_token.dtype)
    distance = (teacher_token.detach() - student_token).pow(2).mean(dim=1)
    terms = {
        "student": criterion(student_logits, targets),
        "teacher": criterion(teacher_logits, targets),
        "consistency": (distance * passed).sum() / passed.sum().clamp_min(1),
    }
    terms["loss"] = sum(w * terms[k] for w, k in zip(weights, ("student", "teacher", "consistency")))
    terms["pass_rate"] = passed.mean()
    terms["logits"] = student_logits
    return terms
