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
    """One reduction as restore mode needs to undo it, and the sizes / source
    map that were current before it."""

    reduction: Reduction
    num_in: int
    sizes: Optional[Tensor]
    source: Optional[Tensor]

    def spread(self, y: Tensor) -> Tensor:
        """The linear part of undoing the reduction: outputs ``y`` back onto its
        inputs, zero where an input fed no output. A reduction with its own
        ``inverse`` (Expedit's W·y reconstruction) is undone by that map."""
        return self.reduction.restore(y, fill=y.new_zeros(y.shape[0], self.num_in, y.shape[-1]))


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

    Undoing a reduction is affine, undo(y) = spread(y) + undo(0), so the state
    keeps the reductions and one ``offset`` on the first grid (the sum of each
    undo(0) spread back there) instead of every reduction's input and output:
    restore mode costs one token grid of memory, not two per reduction.
    """

    def __init__(self, trace_source: bool = False, restore_form: Optional[str] = None) -> None:
        self.trace_source = trace_source
        self.restore_form = restore_form
        self.reset()

    def __getstate__(self) -> dict:
        """Pickled (``torch.save`` of a whole model, ``copy.deepcopy``) without the last
        forward's tensors: those are per forward, and a source map is B·N·N0."""
        return {"trace_source": self.trace_source, "restore_form": self.restore_form}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def reset(self, grid: Optional[tuple[int, int]] = None) -> None:
        self.grid = grid
        self.sizes: Optional[Tensor] = None
        self.source: Optional[Tensor] = None
        self.source_history: list[tuple[int, Tensor]] = []
        self.token_counts: list[int] = []
        self.frames: list[_Frame] = []
        self.offset: Optional[Tensor] = None

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
            self._remember(_Frame(reduction, x.shape[1], sizes, source), x, reduced)
        return reduced

    def _remember(self, frame: _Frame, before: Tensor, after: Tensor) -> None:
        """Add ``frame``'s undo(0) to the offset: the input of a position no output
        covers; in residual form also minus what its token held (undo(y) =
        before + spread(y - after)), so that the update since is what comes back."""
        if frame.reduction.inverse is not None:
            constant = None
        elif self.restore_form == "residual" and not frame.reduction.is_selection:
            constant = before - frame.spread(after)
        else:
            constant = frame.reduction.restore(torch.zeros_like(after), fill=before)
        if constant is not None:
            for earlier in reversed(self.frames):
                constant = earlier.spread(constant)
            self.offset = constant if self.offset is None else self.offset + constant
        self.frames.append(frame)

    def restored(self, x: Tensor) -> Tensor:
        """``x`` brought back to the token grid before every reduction so far
        (the state is left as it is: for intermediates)."""
        for frame in reversed(self.frames):
            x = frame.spread(x)
        return x if self.offset is None else x + self.offset

    def restore(self, x: Tensor) -> Tensor:
        """Like :meth:`restored`, then forget the reductions: sizes and source
        map are those from before the first one."""
        if not self.frames:
            return x
        x = self.restored(x)
        first = self.frames[0]
        self.sizes, self.source = first.sizes, first.source
        self.frames.clear()
        self.offset = None
        return x
