"""Per-layer policy with explicit precedence: global < op type < module-name regex < exact name.

Like torch.ao's QConfigMapping, but settings are dicts merged in precedence order, so a
more specific rule overrides only the keys it names::

    policy = LayerPolicy(global_settings={"mode": "delta", "bits": 8},
                         op_types={"conv2d": {"bits": 16}},
                         module_patterns=[(r".*\\.ff\\..*", {"mode": "full"})],
                         exact_names={"transformer_blocks.0.attn1.to_q": {"mode": "delta"}})
    policy.resolve("transformer_blocks.3.ff.net.2", "linear")  # {"mode": "full", "bits": 8}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerPolicy:
    global_settings: Mapping[str, Any] = field(default_factory=dict)
    op_types: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    module_patterns: Sequence[tuple[str, Mapping[str, Any]]] = ()  # applied in order; later wins
    exact_names: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pattern, _ in self.module_patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"invalid module-name pattern {pattern!r} in LayerPolicy: {error}") from error

    def resolve(self, module_name: str, op_type: str) -> dict[str, Any]:
        """Settings for one layer: each level overrides the keys it sets."""
        settings = dict(self.global_settings)
        settings.update(self.op_types.get(op_type, {}))
        for pattern, values in self.module_patterns:
            if re.fullmatch(pattern, module_name):
                settings.update(values)
        settings.update(self.exact_names.get(module_name, {}))
        return settings
