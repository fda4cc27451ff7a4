"""diffusers' own cache hooks as plain denoisers, for side-by-side comparisons.

``DiffusersCacheHook(model, method, **options)`` copies a diffusers model, applies one of
diffusers' cache hooks to the copy (they patch ``forward`` in Python and keep their
cache in hook objects), and is callable like any denoiser, ``hooked(x, t, *conditions)``,
so diffopt's ``Sampler`` drives it exactly like the optimized programs. It starts a new
hook state when a run starts (the timestep does not decrease, or ``reset()``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

METHODS = ("first-block-cache", "pyramid-attention-broadcast", "taylorseer")


class DiffusersCacheHook:
    def __init__(self, model: torch.nn.Module, method: str, **options: Any):
        from diffusers import hooks

        if method not in METHODS:
            raise ValueError(f"unknown diffusers cache method {method!r}: expected one of {METHODS}")
        self.method, self.options = method, options
        self.model = copy.deepcopy(model).eval()
        self._timestep: int = 0
        self._last_timestep: float | None = None
        if method == "first-block-cache":
            hooks.apply_first_block_cache(self.model, hooks.FirstBlockCacheConfig(**options))
        elif method == "pyramid-attention-broadcast":
            config = hooks.PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: self._timestep, **options)
            hooks.apply_pyramid_attention_broadcast(self.model, config)
        else:
            hooks.apply_taylorseer_cache(self.model, hooks.TaylorSeerCacheConfig(**options))

    def __repr__(self) -> str:
        return f"DiffusersCacheHook({self.method}, {self.options})"

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()
        self._last_timestep = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = torch.as_tensor(t).expand(x.shape[0])
        if self._last_timestep is not None and float(t.max()) >= self._last_timestep:
            self.reset()
        self._last_timestep, self._timestep = float(t.max()), int(t.max())
        # models without diffusers' CacheMixin (DiTTransformer2DModel) have no cache_context(): set it directly
        _set_cache_context(self.model, CacheContext("denoise"))
        try:
            with torch.no_grad():
                return self.model(x, t, *conditions, return_dict=False)[0]
        finally:
            _set_cache_context(self.model, None)
