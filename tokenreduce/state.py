"""Per-forward state of a reduced model, kept in one place and reset each forward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reduction import Reduction


class ReductionState:
    """Token sizes, the optional source map and the token counts of the last forward.

    ``sizes`` [B, N, 1] counts the input patches (and prefix tokens) each token
    stands for; None until the first reduction (all ones). ``source`` [B, N, N0]
    says which of the N0 input tokens each token covers (only with ``trace_source``);
    ``source_history`` keeps ``(block index, source)`` after every reduction, for
    visualising each stage. The block index is the number of blocks entered so
    far minus one: adapters call ``record_tokens`` on entering each block.
    """

    def __init__(self, trace_source: bool = False) -> None:
        self.trace_source = trace_source
        self.reset()

    def reset(self) -> None:
        self.sizes: Optional[Tensor] = None
        self.source: Optional[Tensor] = None
        self.source_history: list[tuple[int, Tensor]] = []
        self.token_counts: list[int] = []

    def record_tokens(self, x: Tensor) -> None:
        self.token_counts.append(x.shape[1])

    def apply(self, reduction: Reduction, x: Tensor) -> Tensor:
        """Reduce ``x`` and carry sizes (and the source map) along."""
        if self.trace_source:
            source = self.source
            if source is None:
                source = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
            self.source = reduction.carry(source)
            self.source_history.append((len(self.token_counts) - 1, self.source))
        x, self.sizes = reduction.apply(x, self.sizes)
        return x
