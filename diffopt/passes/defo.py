"""Defo: decide per layer whether temporal-difference processing pays, keep the rest full.

Before: a ``TemporalDifferencePass`` would turn every linear op into its delta form.
After: the same pass runs with the layer policy extended by one decision per layer
group (layers that read one input share one difference, so they are decided together):
``delta`` where the group's delta computation costs less than its ops in full form,
``full`` otherwise, with the reason (both costs) in each layer's annotation.

The costs come from a ``LayerProfile`` (``measure.defo_profile.profile_layers``):
``cost="measured"`` uses each group's median wall time on the profiled backend,
``cost="model"`` a cost model that never looks at a clock during the decision. A layer the
user's policy sets ``mode`` for keeps the user's choice (reason: "policy override").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from diffopt.ir.layers import linear_layers, op_name
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.profile import LayerProfile
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import DELTA, FULL
from diffopt.passes.base import PassContext, VariantPass
from diffopt.passes.temporal_difference import TemporalDifferencePass

COSTS = ("model", "measured")


@dataclass(frozen=True)
class DefoPass(VariantPass):
    profile: LayerProfile = field(compare=False, repr=False, default=None)
    difference: TemporalDifferencePass = TemporalDifferencePass("exact")
    cost: str = "model"

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, found {self.cost!r}")
        if not isinstance(self.profile, LayerProfile):
            raise ValueError("DefoPass needs profile=profile_layers(...) (or LayerProfile.load(path))")
        if self.profile.difference != dataclasses.asdict(self.difference):
            raise ValueError(f"the profile was measured for {self.profile.difference}, not for {self.difference}")

    kind: ClassVar[str] = TemporalDifferencePass.kind
    first_variants: ClassVar[bool] = TemporalDifferencePass.first_variants

    @property
    def needs_calibration(self) -> bool:
        return self.difference.needs_calibration

    def decisions(self, context: PassContext) -> dict[str, dict[str, str]]:
        """Per layer: ``{"mode": ..., "reason": ...}`` (the user's policy wins where it sets a mode)."""
        decided = {}
        for group in self.profile.groups.values():
            delta_s, full_s = getattr(group, f"delta_{self.cost}_s"), getattr(group, f"full_{self.cost}_s")
            mode = DELTA if delta_s < full_s else FULL
            reason = (
                f"Defo ({self.cost}): delta {delta_s * 1e6:.1f} us {'<' if mode == DELTA else '>='} "
                f"full {full_s * 1e6:.1f} us at batch {self.profile.batch_size}"
            )
            for layer in group.layers:
                decided[layer] = {"mode": mode, "reason": reason}
        return decided

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram | None:
        """``self.difference`` with the user's policy extended by the decisions."""
        user, decisions, decided = context.policy, self.decisions(context), {}
        for module in program.variants.values():
            for op, layer in linear_layers(module.graph).items():
                if "mode" in user.resolve(layer, op_name(op)):
                    decided[layer] = {"reason": "policy override"}
                elif layer in decisions:
                    decided[layer] = decisions[layer]
        exact_names = {
            **decided,
            **{name: {**decided.get(name, {}), **settings} for name, settings in user.exact_names.items()},
        }
        policy = LayerPolicy(user.global_settings, user.op_types, user.module_patterns, exact_names)
        return self.difference.rewrite(program, dataclasses.replace(context, policy=policy))
