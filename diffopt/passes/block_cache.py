"""Block caching: reuse what whole blocks computed on an earlier step.

``BlockCachePass`` (FORA / DeepCache style, fixed period), a preset of ``passes.caching``
(``blocks`` target, ``periodic`` policy, ``reuse`` predictor). Before: every step runs every
block. After: variant ``full`` runs them and stores, per selected block, its residual
``out - in`` (a block whose output has the shape of its hidden input, e.g. a transformer
block) or else its output (e.g. a UNet up block); variant ``cached`` rebuilds the
block's output from the cache (``in + residual``, or the stored output), so the block,
and everything that only fed it, is gone from that graph. Caching UNet ``up_blocks.1``
this way leaves only the outermost down/up blocks live: DeepCache.

``FirstBlockCachePass`` (adaptive; diffusers' FirstBlockCache), a preset of
``passes.caching`` (``after_first`` residual target, ``error_gated`` policy relative to
the forecast, ``reuse`` predictor). Variant ``probe`` runs the model up to the first block
of the chain and returns the change of the first block's residual since the last full
step, ``mean|r - r_ref| / mean|r_ref|``. At or below ``threshold`` the ``cached`` variant
adds the stored residual of all later blocks to the first block's output; above it
``full`` recomputes them and refreshes ``r_ref`` and the stored residual. The first
block's output reaches both variants through state, so the first block runs once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffopt.ir.layers import require_blocks, require_chain
from diffopt.ir.program import StepProgram
from diffopt.passes.base import (
    PassContext,
    PassKind,
    VariantPass,
    register_pass,
)
from diffopt.passes.caching.policies import ErrorGated, Periodic
from diffopt.passes.caching.predictors import Reuse
from diffopt.passes.caching.rewrite import cache_rewrite
from diffopt.passes.caching.targets import AfterFirst, Blocks
from diffopt.util.validation import block_names, chain_names, require_int, require_number


@register_pass
@dataclass(frozen=True)
class BlockCachePass(VariantPass):
    kind: ClassVar[str] = PassKind.CACHE
    after: ClassVar[tuple[str, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    blocks: tuple[str, ...] | None = None  # e.g. ("transformer_blocks.1", ...); None: every block
    period: int = 2

    def __post_init__(self) -> None:
        require_int(self.name, "period", self.period, minimum=1)
        object.__setattr__(self, "blocks", block_names(self.name, self.blocks))

    def check_model(self, model: torch.nn.Module) -> None:
        require_blocks(model, self.blocks, self.name)

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        """The preset: each selected block's residual (or output) reused between refreshes
        every ``period`` steps (``passes.caching``: ``blocks`` x ``periodic`` x ``reuse``)."""
        return cache_rewrite(
            program,
            self.name,
            Blocks(blocks=self.blocks),
            Periodic(self.period),
            Reuse(),
            state_name=lambda target, _: f"{target.name}.cached_{'output' if target.head is None else 'residual'}",
        )


@register_pass
@dataclass(frozen=True)
class FirstBlockCachePass(VariantPass):
    kind: ClassVar[str] = PassKind.CACHE
    after: ClassVar[tuple[str, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    threshold: float = 0.05
    container: str | tuple[str, ...] | None = None  # the chain(s) of blocks, see block_chain; None: the only chain

    def __post_init__(self) -> None:
        require_number(self.name, "threshold", self.threshold, minimum=0.0)
        object.__setattr__(self, "container", chain_names(self.name, self.container))

    def check_model(self, model: torch.nn.Module) -> None:
        require_chain(model, self.container, self.name)

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        """The preset: the residual of the blocks after the first reused while the first
        block's residual moves at most ``threshold`` from the last full step's
        (``passes.caching``: ``after_first`` x ``error_gated`` relative to the forecast x
        ``reuse``)."""
        return cache_rewrite(
            program,
            self.name,
            AfterFirst(container=self.container, value="residual"),
            ErrorGated(threshold=self.threshold, relative_to="forecast"),
            Reuse(),
        )
