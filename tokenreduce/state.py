"""Per-forward state of a reduced model, kept in one place and reset each forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .reduction import Reduction

RESTORE_POINTS = ("end", "block")
RESTORE_FORMS = ("copy", "residual")


@dataclass(frozen=True)
class Restore:
    """Restore mode: where tokens come back to the full grid (``at``: after the
    last block, or at the end of every block) and how (``form``, see
    :class:`ReductionState`)."""

    at: str = "end"
    form: str = "residual"

    def __post_init__(self) -> None:
        if self.at not in RESTORE_POINTS:
            raise ValueError(f"restore_at={self.at!r} must be one of {RESTORE_POINTS}")
        if self.form not in RESTORE_FORMS:
            raise ValueError(f"restore_form={self.form!r} must be one of {RESTORE_FORMS}")


@dataclass
class _Frame:
    """One reduction as restore mode needs to undo it: the tokens that entered
    it (``before``), those it produced (``after``, residual form only) and the
    sizes / source map that were current before it."""

    reduction: Reduction
    before: Tensor
    after: Optional[Tensor]
    sizes: Optional[Tensor]
    source: Optional[Tensor]

    def undo(self, y: Tensor) -> Tensor:
        """``y`` (the outputs of this reduction, later) on the grid that entered it.

        A reduction with its own ``inverse`` is undone by it in both forms: the
        inverse is a method's reconstruction of every position from the outputs
        (Expedit: W·y), not a map whose residual update would mean the same."""
        if self.after is None or self.reduction.is_selection or self.reduction.inverse is not None:
            return self.reduction.restore(y, fill=self.before)
        return self.before + self.reduction.restore(y - self.after, fill=torch.zeros_like(self.before))


class ReductionState:
    """Token sizes, the optional source map and the token counts of the last forward.

    ``grid`` is the patch-token grid (rows, cols) of the forward's image, set by
    the adapter, for methods that see patch tokens as a grid (clustering; on Swin
    the grid of the stage that was clustered, which its last block reconstructs).
    ``sizes`` [B, N, 1] counts the input patches (and prefix tokens) each token
    stands for; None until the first reduction (all ones). ``source`` [B, N, N0]
    says which of the N0 input tokens each token covers (only with ``trace_source``);
    ``source_history`` keeps ``(block index, source)`` after every reduction, for
    visualising each stage. ``token_counts`` holds the tokens entering the first
    block, then those each block ends with (before any restore); the block index
    of a reduction is their count minus one.

    With ``restore_form`` set (restore mode) every reduction is remembered until
    :meth:`restore` brings the tokens back to the grid before the first one:
    ``"residual"`` gives each position its own value at the reduction plus what
    the token it went into gained afterwards (the residual stream's update, as
    tomesd unmerges); ``"copy"`` gives each position the output of that token
    itself. Pruned tokens keep their value at the reduction in both forms, and a
    reduction with its own ``inverse`` is restored by that map in both forms.
    """

    def __init__(self, trace_source: bool = False, restore_form: Optional[str] = None) -> None:
        self.trace_source = trace_source
        self.restore_form = restore_form
        self.reset()

    def reset(self, grid: Optional[tuple[int, int]] = None) -> None:
        self.grid = grid
        self.sizes: Optional[Tensor] = None
        self.source: Optional[Tensor] = None
        self.source_history: list[tuple[int, Tensor]] = []
        self.token_counts: list[int] = []
        self.frames: list[_Frame] = []

    def record_tokens(self, x: Tensor) -> None:
        self.record_count(x.shape[1])

    def record_count(self, count: int) -> None:
        """Tokens per sample where they are not ``x.shape[1]`` (Swin: all its windows)."""
        self.token_counts.append(count)

    def apply(self, reduction: Reduction, x: Tensor) -> Tensor:
        """Reduce ``x`` and carry sizes (and the source map) along."""
        sizes, source = self.sizes, self.source
        if self.trace_source:
            current = source
            if current is None:
                current = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
            self.source = reduction.carry(current)
            self.source_history.append((len(self.token_counts) - 1, self.source))
        reduced, self.sizes = reduction.apply(x, sizes)
        if self.restore_form is not None:
            after = reduced if self.restore_form == "residual" else None
            self.frames.append(_Frame(reduction, x, after, sizes, source))
        return reduced

    def restored(self, x: Tensor) -> Tensor:
        """``x`` brought back to the token grid before every reduction so far
        (the state is left as it is: for intermediates)."""
        for frame in reversed(self.frames):
            x = frame.undo(x)
        return x

    def restore(self, x: Tensor) -> Tensor:
        """Like :meth:`restored`, then forget the reductions: sizes and source
        map are those from before the first one."""
        if not self.frames:
            return x
        x = self.restored(x)
        first = self.frames[0]
        self.sizes, self.source = first.sizes, first.source
        self.frames.clear()
        return x
