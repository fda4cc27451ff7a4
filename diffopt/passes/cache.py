"""``CachePass``: a cache made of a target, a refresh policy and a predictor.

Before: every step computes the target. After: ``full`` steps (the policy's) compute it and
update the predictor; the others put the predictor's value in its place
(``passes.caching.rewrite``). Any target kind works with any policy and any predictor; in a
pass file each part is an object with a ``kind`` and its options, e.g.
``{"pass": "CachePass", "target": {"kind": "span", "value": "output"}, "policy": {"kind":
"taylorseer", "warmup": 3, "period": 4}, "predictor": {"kind": "taylorseer", "order": 2}}``.
One target kind may select several targets (``blocks``: each block; ``modules``: each
module), all under one policy. Two ``CachePass``es in one program are refused by the pass
contract (one pass of kind ``cache``): their plans would need a variant per combination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from diffopt.ir.program import StepProgram
from diffopt.passes.base import PassContext, PassKind, VariantPass, register_pass
from diffopt.passes.caching.policies import POLICIES, Policy
from diffopt.passes.caching.predictors import PREDICTORS, Predictor, part_from_dict
from diffopt.passes.caching.rewrite import cache_rewrite
from diffopt.passes.caching.targets import TARGETS, Target


@register_pass
@dataclass(frozen=True)
class CachePass(VariantPass):
    kind: ClassVar[str] = PassKind.CACHE
    after: ClassVar[tuple[str, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    target: Any = "span"  # a Target, or its pass-file dict / kind
    policy: Any = "periodic"  # a Policy, likewise
    predictor: Any = "reuse"  # a Predictor, likewise
    label: str = "CachePass"  # names its state entries

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", part_from_dict(self.target, Target, TARGETS, "CachePass.target"))
        object.__setattr__(self, "policy", part_from_dict(self.policy, Policy, POLICIES, "CachePass.policy"))
        object.__setattr__(
            self, "predictor", part_from_dict(self.predictor, Predictor, PREDICTORS, "CachePass.predictor")
        )
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"CachePass.label is a non-empty string, found {self.label!r}")

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        return cache_rewrite(program, self.label, self.target, self.policy, self.predictor)
