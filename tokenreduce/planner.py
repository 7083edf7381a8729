"""The best token-reduction setting for a budget: input resolution × method × options.

A hand search on the DINOv2 ViT-S/14 found that at −50 % FLOPs a lower input
resolution plus light merging (182 px + ToMe r=6) beats every published
schedule; :func:`plan` does that search for any timm ViT, a few calibration
images and a budget, cheaply:

* GFLOPs are predicted, not counted, while searching: each block's attention
  half and MLP half are counted with fvcore at three token counts (their cost is
  quadratic in the token count, so three counts give it exactly), the rest of the
  model once per input size; a setting's token counts come from one batch-1
  forward. Only the candidates that will be evaluated are counted exactly.
* Within a family (a method with every option fixed but one knob, e.g. ToMe's r)
  FLOPs fall and fidelity falls as the knob strengthens, so only the weakest
  settings that meet the budget can be best: a binary search finds them and the
  stronger ones are never evaluated. Input sizes below the largest one that meets
  the budget unreduced are dropped the same way (same model, fewer FLOPs).
* Fidelity (cosine of the features to the unreduced model at its own input
  size: no labels needed) is measured on a few images first, then on more
  images for the best third (successive halving), always on nested prefixes of
  one shuffled order, so each stage only runs the new images.
* Speed is measured (the unreduced model interleaved, see
  ``evaluation.measure_throughput``) for the finalists, and decides feasibility
  when the budget is a speedup, a throughput or a latency.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .api import apply, remove, token_counts
from .evaluation.data import data_config, eval_transform
from .evaluation.inference import features_and_logits
from .evaluation.metrics import cosine_similarities, topk_correct
from .evaluation.probe import fit_linear_probe
from .evaluation.settings import parse_setting
from .evaluation.speed import measure_throughput
from .flops import count_flops, flop_analysis

BUDGET_KINDS = ("flops", "gflops", "speedup", "img_per_s", "latency_ms")
MEASURED_KINDS = ("speedup", "img_per_s", "latency_ms")
SCORES = ("cos_mean", "top1", "agreement", "heldout_agreement", "heldout_top1")
HELDOUT_FOLDS = 4
DEFAULT_FAMILIES = ("tome", "tome_rising", "tome_falling", "evit", "evit_late", "mctf", "token_transforming")
DEFAULT_STAGES = (16, 48, 144, 432)


@dataclass(frozen=True)
class Budget:
    """What the chosen setting may cost.

    ``flops``: a fraction of the unreduced model's GFLOPs (0.5: −50 %);
    ``gflops``: absolute GFLOPs per image; ``speedup``: measured speedup over the
    unreduced model; ``img_per_s``: measured throughput; ``latency_ms``: measured
    milliseconds per image at batch 1. FLOPs are fvcore's (one multiply-add = one FLOP).
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind {self.kind!r} is unknown; allowed: {', '.join(BUDGET_KINDS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value) \
                or self.value <= 0:
            raise ValueError(f"budget {self.kind}={self.value!r} must be a finite number > 0")
        if self.kind == "flops" and self.value > 1:
            raise ValueError(f"budget flops={self.value} is a fraction of the unreduced GFLOPs: allowed (0, 1]")

    @property
    def measured(self) -> bool:
        return self.kind in MEASURED_KINDS

    def target_gflops(self, baseline_gflops: float, baseline_img_per_s: Optional[float] = None) -> float:
        """The GFLOPs the search aims at (for measured budgets: FLOPs saved taken to become time)."""
        if self.kind == "flops":
            return self.value * baseline_gflops
        if self.kind == "gflops":
            return self.value
        if self.kind == "speedup":
            return baseline_gflops / self.value
        rate = self.value if self.kind == "img_per_s" else 1000.0 / self.value
        return baseline_gflops * baseline_img_per_s / rate

    def met(self, gflops: float, img_per_s: Optional[float], speedup: Optional[float], target: float) -> bool:
        """Whether a setting with these counted / measured numbers fits."""
        if not self.measured:
            return gflops <= target * (1 + 1e-9)
        if self.kind == "speedup":
            return speedup >= self.value
        if self.kind == "img_per_s":
            return img_per_s >= self.value
        return 1000.0 / img_per_s <= self.value

    @property
    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclass(frozen=True)
class Family:
    """Settings of one method that differ in one knob, listed from weakest to strongest."""

    name: str
    method: str
    values: tuple
    options_of: Callable[[Any], dict]

    def options(self, index: int) -> dict:
        return self.options_of(self.values[index])


def setting_text(method: str, options: dict) -> str:
    """The ``--setting`` string (``tome:r=6``), without spaces (quote it for a shell when it has brackets)."""
    if not options:
        return method
    return method + ":" + ",".join(f"{k}={v!r}".replace(" ", "") for k, v in options.items())


def _grid(start: float, stop: float, step: float) -> tuple:
    count = int(round((stop - start) / step))
    return tuple(round(start + i * step, 4) for i in range(count + 1))


def method_families(num_patches: int, num_blocks: int, names: Sequence[str] = DEFAULT_FAMILIES) -> list[Family]:
    """The searched families for a ViT with ``num_patches`` patch tokens and ``num_blocks`` blocks."""
    quarters = tuple(sorted({max(1, num_blocks * q // 4) for q in (1, 2, 3)} & set(range(num_blocks))))
    late = tuple(sorted({min(b + 1, num_blocks - 1) for b in quarters}))
    r_values = tuple(range(1, max(2, num_patches // 2) + 1))
    every_block = list(range(num_blocks))
    known = {
        "tome": Family("tome", "tome", r_values, lambda r: {"r": r}),
        "tome_rising": Family("tome_rising", "tome", r_values, lambda r: {"r": (r, 0.5)}),
        "tome_falling": Family("tome_falling", "tome", r_values, lambda r: {"r": (r, -0.5)}),
        "evit": Family("evit", "evit", _grid(0.95, 0.2, -0.05), lambda k: {"keep_rate": k, "locations": quarters}),
        "evit_late": Family("evit_late", "evit", _grid(0.95, 0.2, -0.05),
                            lambda k: {"keep_rate": k, "locations": late}),
        "mctf": Family("mctf", "mctf", r_values, lambda r: {"r": r, "locations": every_block}),
        "token_transforming": Family("token_transforming", "token_transforming", _grid(0.02, 0.45, 0.01),
                                     lambda r: {"r": r}),
        "zero_tprune": Family("zero_tprune", "zero_tprune", _grid(0.025, 0.45, 0.025),
                              lambda p: {"prune_s": p, "prune_i": p, "locations": quarters}),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown famil(ies) {unknown}; allowed: {', '.join(known)}")
    return [known[n] for n in names]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, score) points no other point beats: none has cost ≤ and
    score ≥ with one of them strict. Sorted by cost; duplicates keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def resized_model(model: nn.Module, img_size: int) -> nn.Module:
    """A copy of a timm ViT taking ``img_size`` inputs, position embeddings resampled
    (timm's ``set_input_size``, bicubic, as ``dynamic_img_size`` does per forward)."""
    if not hasattr(model, "set_input_size"):
        raise ValueError(f"{type(model).__name__} cannot change its input size (no set_input_size); "
                         "give plan() a model_at function or sizes=[its size]")
    resized = copy.deepcopy(model)
    resized.set_input_size(img_size=(img_size, img_size))
    return resized.eval()


def native_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None or size[0] != size[1]:
        raise ValueError("the planner needs a timm ViT with a square patch_embed.img_size")
    return int(size[0])


def default_sizes(model: nn.Module) -> list[int]:
    """Multiples of the patch size from half the native input size up to it."""
    native, patch = native_size(model), int(model.patch_embed.patch_size[0])
    return [s for s in range(patch, native + 1, patch) if s >= native // 2]


class CostModel:
    """Predicted GFLOPs of a timm ViT from its token counts (see the module docstring)."""

    def __init__(self, model: nn.Module):
        block = model.blocks[0]
        if not all(type(b) is type(block) for b in model.blocks) or not hasattr(block, "mlp"):
            raise ValueError("the planner needs a timm ViT whose blocks are alike (attn, mlp)")
        dim = model.embed_dim
        halves = {"attn": nn.Sequential(block.norm1, _Mixer(block.attn), block.ls1),
                  "mlp": nn.Sequential(block.norm2, block.mlp, block.ls2)}
        counts = (1, 2, 3)
        self.coefficients = {}
        with torch.no_grad():
            for name, half in halves.items():
                half.eval()
                flops = [flop_analysis(half, torch.zeros(1, n, dim)).total() for n in counts]
                # exact quadratic through the three counts
                c = (flops[2] - 2 * flops[1] + flops[0]) / 2
                b = flops[1] - flops[0] - 3 * c
                a = flops[0] - b - c
                self.coefficients[name] = (a, b, c)
        self.outside: dict[int, float] = {}

    def half(self, name: str, tokens: int) -> float:
        a, b, c = self.coefficients[name]
        return a + b * tokens + c * tokens * tokens

    def blocks(self, counts: Sequence[int]) -> float:
        return sum(self.half("attn", counts[i]) + self.half("mlp", counts[i + 1]) for i in range(len(counts) - 1))

    def calibrate(self, img_size: int, unreduced_gflops: float, counts: Sequence[int]) -> None:
        """Everything outside the blocks at this size: the exact count minus the blocks."""
        self.outside[img_size] = unreduced_gflops * 1e9 - self.blocks(counts)

    def predict(self, img_size: int, counts: Sequence[int]) -> float:
        return (self.outside[img_size] + self.blocks(counts)) / 1e9


class _Mixer(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x)


@dataclass(eq=False)  # compared by identity: they hold feature tensors
class Candidate:
    setting: str
    method: str
    options: dict
    img_size: int
    family: str
    predicted_gflops: float
    gflops: Optional[float] = None
    features: list = field(default_factory=list)  # per batch of calibration images, in order
    logits: list = field(default_factory=list)
    stage: int = 0
    img_per_s: Optional[float] = None
    speedup: Optional[float] = None

    @property
    def images(self) -> int:
        return sum(len(f) for f in self.features)


class _Calibration:
    """The calibration images at each input size, features computed in nested prefixes."""

    def __init__(self, images: Sequence[Any], labels: Optional[Sequence[int]], seed: int,
                 transform_at: dict[int, Callable]):
        order = list(range(len(images)))
        random.Random(seed).shuffle(order)
        self.images = [images[i] for i in order]
        self.labels = None if labels is None else torch.tensor([labels[i] for i in order])
        self.transform_at = transform_at

    def batch(self, img_size: int, start: int, stop: int) -> Tensor:
        transform = self.transform_at[img_size]
        return torch.stack([transform(image) for image in self.images[start:stop]])


class HeldOutProbes:
    """Linear probes fitted on folds of the unreduced model's calibration features, each
    image classified by the probe that did not see it.

    Why: a probe is sure of the images it was fitted on (the shared Imagenette probe
    scores 99.5 % on its training images, 88 % on val), so agreement measured there
    hardly moves under reduction; out-of-fold, images near the class boundaries
    behave as unseen ones do."""

    def __init__(self, features: Tensor, labels: Tensor, num_classes: int, folds: int = HELDOUT_FOLDS):
        self.fold = torch.arange(len(features)) % folds
        with torch.inference_mode(False):  # plan() runs in inference mode; fitting needs autograd
            self.probes = [fit_linear_probe(features[self.fold != k], labels[self.fold != k], num_classes)
                           for k in range(folds)]

    def classes(self, features: Tensor) -> Tensor:
        out = torch.empty(len(features), dtype=torch.long)
        for k, (weight, bias) in enumerate(self.probes):
            chosen = self.fold[:len(features)] == k
            out[chosen] = (features[chosen] @ weight.T + bias).argmax(1)
        return out


def _score(cand_feats: Tensor, ref_feats: Tensor, cand_logits: Optional[Tensor], ref_logits: Optional[Tensor],
           labels: Optional[Tensor], score: str, heldout: Optional[HeldOutProbes] = None) -> dict[str, Optional[float]]:
    sims = cosine_similarities(ref_feats, cand_feats)
    out: dict[str, Optional[float]] = {"cos_mean": sims.mean().item(),
                                       "cos_p5": torch.quantile(sims, 0.05).item(), "top1": None, "agreement": None,
                                       "heldout_agreement": None, "heldout_top1": None}
    if heldout is not None:
        reference, reduced = heldout.classes(ref_feats), heldout.classes(cand_feats)
        out["heldout_agreement"] = 100.0 * (reduced == reference).double().mean().item()
        out["heldout_top1"] = 100.0 * (reduced == labels[:len(reduced)]).double().mean().item()
    if cand_logits is not None:
        out["agreement"] = 100.0 * (cand_logits.argmax(1) == ref_logits.argmax(1)).double().mean().item()
        if labels is not None:
            hits = topk_correct(cand_logits, labels[:len(cand_logits)], (1,))[:, 0]
            out["top1"] = 100.0 * hits.double().mean().item()
    return out


@torch.inference_mode()
def plan(model: nn.Module, images: Sequence[Any], budget: Union[Budget, float], *,
         labels: Optional[Sequence[int]] = None,
         probe: Optional[nn.Module] = None, sizes: Optional[Sequence[int]] = None,
         families: Sequence[str] = DEFAULT_FAMILIES, per_family: int = 1,
         stages: Sequence[int] = DEFAULT_STAGES, keep: float = 1 / 3, finalists: int = 3,
         score: Optional[str] = None, model_at: Optional[Callable[[int], nn.Module]] = None,
         transform_at: Optional[Callable[[int], Callable]] = None, batch_size: int = 16,
         speed_batch_size: int = 16, speed_repeats: int = 3, seed: int = 0,
         progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Search input size × method × options for the setting that keeps the model's
    features best within ``budget`` (a :class:`Budget`, or a float: that fraction of
    the unreduced FLOPs); returns the report (see ``tools/plan.py``).

    ``model``: a timm ViT in eval mode at its native input size; ``images``: PIL
    images to calibrate on (never the ones you report on); ``labels`` with a
    ``probe`` (or the model's own head) add top-1. ``model_at(size)`` builds the
    model for another input size (default: timm's pos-embed resampling of a copy);
    ``transform_at(size)`` the preprocessing (default: timm's eval transform of
    the model's data config at that size). ``score``: what ranks the settings,
    ``cos_mean`` (feature cosine to the unreduced model, label-free), ``agreement``
    (same class as the unreduced model, needs a classifier), ``top1`` (needs labels),
    or ``heldout_agreement`` / ``heldout_top1``: the same with linear probes fitted on
    folds of the calibration features, each image classified by a probe that did not
    see it (needs labels, no classifier; see :class:`HeldOutProbes`). Default:
    ``heldout_agreement`` with labels, else ``cos_mean``.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    if isinstance(budget, float):
        budget = Budget("flops", budget)
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget (e.g. Budget('gflops', 3.0)) or a float fraction of the "
                         f"unreduced FLOPs, got {budget!r}")
    if score is None:  # held-out agreement followed val top-1 better on the DINOv2 (README)
        score = "heldout_agreement" if labels is not None else "cos_mean"
    if score not in SCORES:
        raise ValueError(f"score={score!r} must be one of {SCORES}")
    has_classifier = probe is not None or bool(getattr(model, "num_classes", 0))
    if score in ("top1", "agreement") and not has_classifier:
        raise ValueError(f"score={score!r} needs a classifier (a probe or the model's head); use score='cos_mean'")
    if score in ("top1", "heldout_agreement", "heldout_top1") and labels is None:
        raise ValueError(f"score={score!r} needs labels")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    stages = [min(s, len(images)) for s in stages]
    if not stages or stages[0] < 2 or any(b < a for a, b in zip(stages, stages[1:])):
        raise ValueError(f"stages={list(stages)} must be growing image counts >= 2 (there are {len(images)} images)")
    if score.startswith("heldout") and stages[0] < 2 * HELDOUT_FOLDS:
        raise ValueError(f"score={score!r} fits probes on {HELDOUT_FOLDS} folds: the first stage needs at least "
                         f"{2 * HELDOUT_FOLDS} images, got {stages[0]}")
    if not 0 < keep < 1 or finalists < 1 or per_family < 1:
        raise ValueError(f"keep={keep} must be in (0, 1), finalists={finalists} and per_family={per_family} >= 1")
    native = native_size(model)
    sizes = sorted(set(sizes or default_sizes(model)))
    patch = int(model.patch_embed.patch_size[0])
    bad = [s for s in sizes if not isinstance(s, int) or s <= 0 or s % patch]
    if bad:
        raise ValueError(f"sizes {bad} must be positive multiples of the patch size {patch}")
    model_at = model_at or (lambda size: copy.deepcopy(model).eval() if size == native else resized_model(model, size))
    timings: dict[str, float] = {}

    def timed(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    # ---- baseline, cost model and (for measured budgets) the unreduced speed
    tick = time.perf_counter()
    models = {size: model_at(size) for size in sorted(set(sizes) | {native})}
    transforms = {size: (transform_at or (lambda s: eval_transform(data_config(models[s]))))(size) for size in models}
    baseline_gflops = count_flops(models[native], (3, native, native))
    costs = CostModel(models[native])
    unreduced: dict[int, float] = {}
    for size, sized in models.items():
        unreduced[size] = baseline_gflops if size == native else count_flops(sized, (3, size, size))
        tokens = sized.patch_embed.num_patches + sized.num_prefix_tokens
        costs.calibrate(size, unreduced[size], [tokens] * (len(sized.blocks) + 1))
    baseline_rate = None
    if budget.kind in ("img_per_s", "latency_ms"):
        batch = 1 if budget.kind == "latency_ms" else speed_batch_size
        baseline_rate = measure_throughput([models[native]], (3, native, native), batch, torch.device("cpu"),
                                           warmup=1, repeats=speed_repeats, batches=1)[0]
    target = budget.target_gflops(baseline_gflops, baseline_rate)
    tick = timed("baseline and cost model", tick)

    # ---- candidates: per size, the weakest settings of each family that meet the target
    fitting = [s for s in sizes if unreduced[s] <= target]
    largest_fitting = max(fitting) if fitting else None
    candidates: list[Candidate] = []
    if largest_fitting is not None:
        candidates.append(Candidate("none", "none", {}, largest_fitting, "none", unreduced[largest_fitting],
                                    unreduced[largest_fitting]))
    for size in (s for s in sizes if unreduced[s] > target):
        sized = models[size]
        probe_input = torch.zeros(1, 3, size, size)
        for family in method_families(sized.patch_embed.num_patches, len(sized.blocks), families):
            predicted: dict[int, float] = {}

            def gflops_at(index: int) -> float:
                if index not in predicted:
                    apply(sized, family.method, **family.options(index))
                    sized(probe_input)
                    predicted[index] = costs.predict(size, token_counts(sized))
                    remove(sized)
                return predicted[index]

            strongest = len(family.values) - 1
            if gflops_at(strongest) > target:
                continue  # even its strongest setting is over budget
            low, high = 0, strongest  # binary search: the first (weakest) value at or under the target
            while low < high:
                middle = (low + high) // 2
                if gflops_at(middle) <= target:
                    high = middle
                else:
                    low = middle + 1
            found = 0
            for index in range(low, strongest + 1):
                if found == per_family:
                    break
                options = family.options(index)
                apply(sized, family.method, **options)
                exact = count_flops(sized, (3, size, size))
                remove(sized)
                if exact > target * (1 + 1e-9) and not budget.measured:
                    continue  # the reduction's own work tipped it over: one step stronger
                candidates.append(Candidate(setting_text(family.method, options), family.method, options, size,
                                            family.name, gflops_at(index), exact))
                found += 1
    tick = timed("candidates (predicted and counted GFLOPs)", tick)
    if not candidates:
        raise ValueError(f"no setting meets the budget {budget.label} (target {target:.3f} GFLOPs; the smallest "
                         f"size tried, {sizes[0]} px, costs {unreduced[sizes[0]]:.3f} unreduced): allow smaller "
                         "sizes or a larger budget")
    progress(f"{len(candidates)} candidates at {target:.3f} GFLOPs ({budget.label}) over sizes {sizes}")

    # ---- successive halving on nested prefixes of the calibration images
    calibration = _Calibration(images, labels, seed, transforms)
    reference_features: list[Tensor] = []
    reference_logits: list[Tensor] = []

    def run(sized: nn.Module, size: int, start: int, stop: int, feats: list, logits: list) -> None:
        for first in range(start, stop, batch_size):
            batch = calibration.batch(size, first, min(first + batch_size, stop))
            f, out = features_and_logits(sized, batch, probe)
            feats.append(f.float())
            if out is not None:
                logits.append(out.float())

    heldout_probes: dict[int, HeldOutProbes] = {}

    def heldout(n: int) -> Optional[HeldOutProbes]:
        """Probes fitted on the first n calibration images (once per n)."""
        if calibration.labels is None or n < 2 * HELDOUT_FOLDS:
            return None
        if n not in heldout_probes:
            heldout_probes[n] = HeldOutProbes(torch.cat(reference_features)[:n], calibration.labels[:n],
                                              int(calibration.labels.max()) + 1)
        return heldout_probes[n]

    def scores_of(candidate: Candidate, n: Optional[int] = None) -> dict[str, Optional[float]]:
        n = n or candidate.images
        ref_f = torch.cat(reference_features)[:n]
        ref_l = torch.cat(reference_logits)[:n] if reference_logits else None
        cand_l = torch.cat(candidate.logits)[:n] if candidate.logits else None
        return _score(torch.cat(candidate.features)[:n], ref_f, cand_l, ref_l, calibration.labels, score, heldout(n))

    alive = list(candidates)
    done = 0
    for stage, count in enumerate(stages):
        if stage > 0:
            alive = sorted(alive, key=lambda c: -scores_of(c)[score])
            alive = alive[:max(finalists, math.ceil(len(alive) * keep))]
        if count > done:
            run(models[native], native, done, count, reference_features, reference_logits)
            for size in sorted({c.img_size for c in alive}):
                sized = models[size]
                for candidate in (c for c in alive if c.img_size == size):
                    if candidate.method != "none":
                        apply(sized, candidate.method, **candidate.options)
                    run(sized, size, candidate.images, count, candidate.features, candidate.logits)
                    remove(sized)
                    candidate.stage = stage
            done = count
        progress(f"stage {stage}: {len(alive)} settings on {count} images")
    tick = timed("fidelity (successive halving)", tick)

    ranked = sorted(candidates, key=lambda c: (-c.stage, -scores_of(c)[score]))

    # ---- measured speed of the finalists, side by side with the unreduced model
    def measure(group: list[Candidate]) -> None:
        batch = 1 if budget.kind == "latency_ms" else speed_batch_size
        timed_models = [models[native]]
        for candidate in group:
            sized = copy.deepcopy(models[candidate.img_size])
            if candidate.method != "none":
                apply(sized, candidate.method, **candidate.options)
            timed_models.append(sized)
        rates = measure_throughput(timed_models, (3, native, native), batch, torch.device("cpu"), warmup=1,
                                   repeats=speed_repeats, batches=1,
                                   input_sizes=[(3, native, native)] + [(3, c.img_size, c.img_size) for c in group])
        for candidate, rate in zip(group, rates[1:]):
            candidate.img_per_s, candidate.speedup = rate, rate / rates[0]

    feasible: list[Candidate] = []
    if budget.measured:
        position = 0
        while len(feasible) < finalists and position < len(ranked):
            group = ranked[position:position + finalists]
            measure(group)
            feasible += [c for c in group if budget.met(c.gflops, c.img_per_s, c.speedup, target)]
            position += finalists
        if not feasible:
            raise ValueError(f"no setting measured within the budget {budget.label}; the closest: "
                             + ", ".join(f"{c.setting} at {c.img_size} px ({c.speedup:.2f}x)" for c in ranked[:3]))
    else:
        measure(ranked[:finalists])
        feasible = ranked
    tick = timed("speed of the finalists", tick)

    def row(candidate: Candidate) -> dict[str, Any]:
        scores = scores_of(candidate)
        return {"setting": candidate.setting, "img_size": candidate.img_size, "method": candidate.method,
                "options": candidate.options, "family": candidate.family, "gflops": candidate.gflops,
                "predicted_gflops": candidate.predicted_gflops, "flop_ratio": candidate.gflops / baseline_gflops,
                "fidelity": scores["cos_mean"], "cos_p5": scores["cos_p5"], "agreement": scores["agreement"],
                "heldout_agreement": scores["heldout_agreement"], "heldout_top1": scores["heldout_top1"],
                "top1": scores["top1"], "images": candidate.images, "stage": candidate.stage,
                "img_per_s": candidate.img_per_s, "speedup": candidate.speedup}

    feasible_ranked = [c for c in ranked if c in feasible]
    stage0 = stages[0]

    def first_scores(candidate: Candidate) -> float:  # every candidate has the first stage's images
        return scores_of(candidate, stage0)[score]

    front = pareto_front([(c.gflops, first_scores(c)) for c in feasible_ranked])
    timings["total"] = time.perf_counter() - started
    timings["total_cpu"] = time.process_time() - cpu_started  # on a shared machine the wall time also counts waiting
    return {
        "budget": {"kind": budget.kind, "value": budget.value, "target_gflops": target},
        "baseline": {"img_size": native, "gflops": baseline_gflops, "img_per_s": baseline_rate},
        "score": score,
        "best": row(feasible_ranked[0]),
        "ranked": [row(c) for c in feasible_ranked],
        "pareto": [dict(row(feasible_ranked[i]), pareto_score=first_scores(feasible_ranked[i])) for i in front],
        "pareto_images": stage0,
        "searched": {"sizes": sizes, "families": list(families), "candidates": len(candidates),
                     "stages": list(stages), "calibration_images": len(images)},
        "seconds": timings,
    }


def build(model: nn.Module, setting: str, img_size: int,
          model_at: Optional[Callable[[int], nn.Module]] = None) -> nn.Module:
    """The model a plan's ``setting`` and ``img_size`` describe: ``model`` at that input
    size (``model_at``, default timm's pos-embed resampling of a copy) with the setting applied."""
    parsed = parse_setting(setting)
    if model_at is None and parsed.reduces:  # apply sets the size (remove() undoes it)
        return apply(copy.deepcopy(model), parsed.method, img_size=img_size, **parsed.options).eval()
    sized = model_at(img_size) if model_at else (model if img_size == native_size(model)
                                                 else resized_model(model, img_size))
    return apply(sized, parsed.method, **parsed.options) if parsed.reduces else sized


@torch.inference_mode()
def validate(model: nn.Module, settings: Sequence[tuple[str, int]], images: Sequence[Any],
             labels: Optional[Sequence[int]] = None, probe: Optional[nn.Module] = None,
             model_at: Optional[Callable[[int], nn.Module]] = None, batch_size: int = 32,
             progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Score ``(setting, img_size)`` pairs (a plan's picks) on held-out images against
    the unreduced model at its native size: top-1 (with labels and a classifier),
    feature cosine mean and 5th percentile, class agreement."""
    native = native_size(model)
    reference = None
    rows = []
    for setting, img_size in [("none", native), *settings]:
        built = build(model, setting, img_size, model_at)
        transform = eval_transform(data_config(built))
        feats, logits = [], []
        for first in range(0, len(images), batch_size):
            batch = torch.stack([transform(image) for image in images[first:first + batch_size]])
            f, out = features_and_logits(built, batch, probe)
            feats.append(f.float())
            if out is not None:
                logits.append(out.float())
        feats = torch.cat(feats)
        logits = torch.cat(logits) if logits else None
        if reference is None:
            reference = (feats, logits)
        scores = _score(feats, reference[0], logits, reference[1],
                        None if labels is None else torch.as_tensor(labels), "cos_mean")
        rows.append({"setting": setting, "img_size": img_size, "images": len(feats), **scores})
        progress(f"validated {setting} at {img_size} px on {len(feats)} images")
    return {"baseline": rows[0], "rows": rows[1:]}
