"""A flow-matching transformer turned into a flow map (Align Your Flow, METHODS.md section 5).

``FlowMapTransformer(base)`` computes ``F(x_t, t, s)`` so that the flow map is
``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)``: it jumps from noise level t to s. The
target time s enters like the timestep: ``MLP(sinusoid(s))`` is added to the base
model's conditioning vector (``models.conditioning``: each DiT block's ``norm1.emb``,
PixArt's ``adaln_single.emb``). The MLP's last layer starts at zero, so at
initialisation ``F(x, t, s) = v(x, t)`` for every s, in particular ``F(x, t, t) = v``:
the distillation starts from the teacher's velocity.
"""

from __future__ import annotations

import torch
from torch import nn

from diffopt.models.conditioning import added_to_outputs, conditioning_modules
from diffopt.models.simple_dit import timestep_embedding


class FlowMapTransformer(nn.Module):
    """``forward(hidden_states, timestep, target_timestep, class_labels=None,
    encoder_hidden_states=None) -> F``; both times on the base model's timestep scale (flow
    time x 1000 for the reference models); the conditions given are passed to the base."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        dim = base.inner_dim
        self.frequencies = dim
        self.target_embedding = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.target_embedding[-1].weight)
        nn.init.zeros_(self.target_embedding[-1].bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        target_timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        conditions = {"class_labels": class_labels, "encoder_hidden_states": encoder_hidden_states}
        target = self.target_embedding(timestep_embedding(target_timestep, self.frequencies).to(hidden_states.dtype))
        with added_to_outputs(conditioning_modules(self.base), target):
            return self.base(
                hidden_states,
                timestep=timestep,
                **{name: value for name, value in conditions.items() if value is not None},
                return_dict=False,
            )[0]
