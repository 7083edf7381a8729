"""What a token-reduction method is: options, what it needs from attention, and
a pure function from those tensors to a :class:`~tokenreduce.reduction.Reduction`.

A method never touches a backbone; an adapter (``tokenreduce.adapters``)
computes only what the method declares it needs and applies its reductions.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import Tensor

from ..attention import AttentionMaps
from ..reduction import Reduction


STAGES = ("after_attention", "before_attention")


class Need(enum.Flag):
    """What a method reads from the token mixer of a block (attention in a ViT).

    Each adapter declares which of these its blocks can give; a method that
    needs more is refused by name.
    """

    NOTHING = 0
    KEYS = enum.auto()  # per-token features to match on [B, H, N, D]: attention keys (after q/k norm)
    CLS_ATTENTION = enum.auto()  # softmax row of the class token [B, H, N]
    ATTENTION = enum.auto()  # full probabilities [B, H, N, N]
    IMPORTANCE = enum.auto()  # per-token importance [B, N], >= 0, summing to 1 over the tokens
    # Without the N×N map (``tokenreduce.attention``; float32, no gradient):
    RECEIVED_ATTENTION = enum.auto()  # attention each token receives, mean over the queries [B, H, N]
    ATTENTION_MAPS = enum.auto()  # an AttentionMaps: the probabilities on demand, in bounded pieces
    TOKENS = enum.auto()  # nothing from attention, but the method acts here (stage "before_attention")


# What the ViT adapter reads from q and k.
ATTENTION_NEEDS = (Need.KEYS | Need.CLS_ATTENTION | Need.ATTENTION | Need.IMPORTANCE | Need.RECEIVED_ATTENTION
                   | Need.ATTENTION_MAPS)


@dataclass
class BlockTensors:
    """What the adapter hands a method at one block (only the declared needs are set)."""

    block: int
    x: Tensor  # [B, N, C] residual stream at the method's point in the block
    sizes: Optional[Tensor]  # [B, N, 1] patches per token; None while all are 1
    num_prefix_tokens: int
    keys: Optional[Tensor] = None
    cls_attention: Optional[Tensor] = None
    attention: Optional[Tensor] = None
    importance: Optional[Tensor] = None  # ViT: the head-mean class-attention row; Vim: the SSM output's
    grid: Optional[tuple[int, int]] = None  # patch-token grid (rows, cols) of this forward's image
    received_attention: Optional[Tensor] = None
    attention_maps: Optional[AttentionMaps] = None
    # [B, N] labels: a token may only merge with tokens of its own label (Swin: a
    # shifted-window mask region, padding apart); None: no constraint
    groups: Optional[Tensor] = None


class Options:
    """Base for a method's options dataclass: validation with clear errors."""

    def validate(self, num_blocks: int) -> None:
        """Raise ValueError naming any bad value and what is allowed."""


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False, kinds: tuple[type, ...] = (int, float)) -> None:
    """Raise ValueError unless ``low <= value <= high`` (bounds optionally open)."""
    if isinstance(value, bool) or not isinstance(value, kinds):
        allowed = " or ".join(("an " if k.__name__[0] in "aeiou" else "a ") + k.__name__ for k in kinds)
        raise ValueError(f"{name}={value!r} must be {allowed}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={value!r} is out of range: allowed {lo}{low}, {high}{hi}")


def check_blocks(name: str, blocks: Any, num_blocks: int) -> tuple[int, ...]:
    """Validate a collection of 0-based block indices."""
    if isinstance(blocks, int) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise ValueError(f"{name}={blocks!r} must be a list of block indices (ints)")
    bad = [b for b in blocks if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{name}={blocks!r}: block indices {bad} out of range 0..{num_blocks - 1}")
    return tuple(sorted(set(blocks)))


class Method:
    """A token-reduction method bound to one model (its depth and prefix tokens).

    Subclasses set ``name``, ``Options`` (a dataclass deriving from :class:`Options`
    whose field defaults are the paper's) and implement ``needs`` and ``reduce``.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    requires_class_token: ClassVar[bool] = False
    # Whether ``reduce`` keeps every merge inside one label of ``BlockTensors.groups``
    # (pruning mixes nothing, so it does): adapters that pass groups refuse the others.
    respects_groups: ClassVar[bool] = False
    # Where the adapter calls ``reduce`` in a block (one of STAGES):
    # "after_attention": x is the residual stream after the attention residual,
    #   the reduced tokens go through the MLP (ToMe, EViT);
    # "before_attention": x is the block input, the attention tensors are this
    #   block's on the unreduced tokens, and the attention output is computed for
    #   the reduced tokens (MCTF's one-step-ahead attention).
    stage: ClassVar[str] = "after_attention"
    # Whether the reduced tokens form a smaller grid (``output_grid``: Expedit's
    # clustering): a windowed backbone then runs the rest of the stage on that grid
    # with windows of that size, instead of handing the tokens back after the block.
    forms_grid: ClassVar[bool] = False

    def __init__(self, options: Options, num_blocks: int, num_prefix_tokens: int) -> None:
        options.validate(num_blocks)
        self.options = options
        self.num_blocks = num_blocks
        self.num_prefix_tokens = num_prefix_tokens

    @property
    def proportional_attention(self) -> bool:
        """Whether attention adds log(size) to the logits of each key (option ``prop_attn``)."""
        return bool(getattr(self.options, "prop_attn", False))

    @property
    def one_step_ahead(self) -> bool:
        """Stage "before_attention" only: take the attention output of the reduced
        tokens from this block's probabilities merged through the reduction
        (option ``one_step_ahead``) instead of recomputing attention on them."""
        return bool(getattr(self.options, "one_step_ahead", False))

    @property
    def scan_alignment(self) -> bool:
        """State-space backbones: after tokens are removed, scan with each token's
        state decay scaled by the original scan steps it stands for (option
        ``align``; ToP-ViM's pruning-aware hidden-state alignment)."""
        return bool(getattr(self.options, "align", False))

    def output_grid(self, token_grid: tuple[int, int]) -> tuple[int, int]:
        """``forms_grid`` methods: the grid (rows, cols) a token grid is reduced to."""
        raise NotImplementedError(f"method {self.name!r} does not reduce to a grid")

    def needs(self, block: int) -> Need:
        """What this method reads from the token mixer at ``block`` (static per block)."""
        raise NotImplementedError

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        """The reduction at this block, or None to leave the tokens as they are."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}({self.options})"


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by name to ``apply`` and the tools."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    if cls.stage not in STAGES:
        raise ValueError(f"method {cls.name!r} has stage={cls.stage!r}; allowed: {STAGES}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, dict[str, Any]]:
    """Method names with their options and default values."""
    return {
        name: {f.name: _default(f) for f in dataclasses.fields(cls.Options)}
        for name, cls in sorted(_REGISTRY.items())
    }


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def get_method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}") from None


def build_options(cls: type[Method], options: dict[str, Any]) -> Options:
    """Options dataclass from keyword arguments, rejecting unknown names."""
    allowed = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {cls.name!r}; allowed: {allowed}")
    return cls.Options(**options)
