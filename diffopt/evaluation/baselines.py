"""diffusers' own cache hooks and cache-dit as plain denoisers, for side-by-side comparisons.

``DiffusersCacheHook(model, method, **options)`` copies a diffusers model, applies one of
diffusers' cache hooks to the copy (they patch ``forward`` in Python and keep their
cache in hook objects), and is callable like any denoiser, ``hooked(x, t, *conditions)``
(in the model's argument order, or by the names of a captured ``signature=``),
so diffopt's ``Sampler`` drives it exactly like the optimized programs. It starts a new
hook state when a run starts (the timestep does not decrease, or ``reset()``).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
from collections.abc import Callable
from typing import Any

import torch

from diffopt.ir.signature import Signature

METHODS = ("first-block-cache", "pyramid-attention-broadcast", "taylorseer", "mag-cache")


class DiffusersCacheHook:
    def __init__(self, model: torch.nn.Module, method: str, signature: Signature | None = None, **options: Any):
        from diffusers import hooks

        if method not in METHODS:
            raise ValueError(f"unknown diffusers cache method {method!r}: expected one of {METHODS}")
        self.method, self.options, self.signature = method, options, signature
        self.model = copy.deepcopy(model).eval()
        self._timestep: int = 0
        self._last_timestep: float | None = None
        if method == "first-block-cache":
            hooks.apply_first_block_cache(self.model, hooks.FirstBlockCacheConfig(**options))
        elif method == "pyramid-attention-broadcast":
            config = hooks.PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: self._timestep, **options)
            hooks.apply_pyramid_attention_broadcast(self.model, config)
        elif method == "mag-cache":
            hooks.apply_mag_cache(self.model, hooks.MagCacheConfig(**options))
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
                return _call(self.model, self.signature, x, t, conditions)
        finally:
            _set_cache_context(self.model, None)


def _call(model: torch.nn.Module, signature: Signature | None, x, t, conditions) -> torch.Tensor:
    """``model(x, t, *conditions)``; by name with a ``signature`` (models whose forward takes the
    conditions before the timestep, e.g. SD3)."""
    if signature is None:
        return model(x, t, *conditions, return_dict=False)[0]
    return model(**dict(zip(signature.input_names, (x, t, *conditions))), return_dict=False)[0]


_MAG_RATIOS_MARKER = "Copy these values to MagCacheConfig(mag_ratios=...):"


def mag_cache_ratios(model: torch.nn.Module, num_steps: int, run: Callable[[Callable], Any]) -> list[float]:
    """MagCache's per-step residual magnitude ratios for ``model`` at ``num_steps`` steps:
    ``run(denoiser)`` samples once with diffusers' calibrating hook, which prints them (its
    only output of them); they are read back from that print."""
    hook = DiffusersCacheHook(model, "mag-cache", calibrate=True, num_inference_steps=num_steps)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(hook)
    text = printed.getvalue()
    if _MAG_RATIOS_MARKER not in text:
        raise RuntimeError(f"diffusers' MagCache calibration printed no ratios (output: {text[-300:]!r})")
    ratios = ast.literal_eval(text.split(_MAG_RATIOS_MARKER, 1)[1].strip().splitlines()[0])
    if len(ratios) != num_steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {num_steps} steps")
    return [float(r) for r in ratios]


class CacheDitBaseline:
    """cache-dit (an optional benchmark dependency: ``pip install diffopt[bench]``) on a copy
    of a diffusers transformer, callable like any denoiser.

    ``options`` are ``DBCacheConfig`` fields (e.g. ``Fn_compute_blocks=1``,
    ``residual_diff_threshold=0.2``, ``max_warmup_steps=4``); ``taylorseer_order`` adds its
    TaylorSeer calibrator, ``calibrator="foca"`` its FoCa one (BDF2 predictor, Heun
    corrector). cache-dit counts steps inside its context, which must be rebuilt before
    every run (``cache_dit.refresh_context``) or its schedule shifts by one step: this
    wrapper does that whenever a run starts (the timestep does not decrease, or ``reset()``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_steps: int,
        taylorseer_order: int | None = None,
        calibrator: str | None = None,
        **options: Any,
    ):
        try:
            import cache_dit
        except ImportError as error:
            raise ImportError("the cache-dit baseline needs cache-dit: pip install 'diffopt[bench]'") from error
        if calibrator is None and taylorseer_order is not None:
            calibrator = "taylorseer"
        if calibrator not in (None, "taylorseer", "foca"):
            raise ValueError(f"cache-dit calibrator must be 'taylorseer' or 'foca', found {calibrator!r}")
        self.options, self.calibrator = {**options, "num_inference_steps": num_steps}, calibrator
        self.taylorseer_order = taylorseer_order or 1
        self.model = copy.deepcopy(model).eval()
        self._cache_dit = cache_dit
        cache_dit.enable_cache(self.model, **self._configs())
        self._last_timestep: float | None = None

    def _configs(self) -> dict[str, Any]:
        configs: dict[str, Any] = {"cache_config": self._cache_dit.DBCacheConfig(**self.options)}
        if self.calibrator == "taylorseer":
            configs["calibrator_config"] = self._cache_dit.TaylorSeerCalibratorConfig(
                taylorseer_order=self.taylorseer_order
            )
        elif self.calibrator == "foca":
            configs["calibrator_config"] = self._cache_dit.FoCaCalibratorConfig()
        return configs

    def __repr__(self) -> str:
        return f"CacheDitBaseline({self.options}, calibrator={self.calibrator})"

    def reset(self) -> None:
        self._cache_dit.refresh_context(self.model, **self._configs())
        self._last_timestep = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).expand(x.shape[0])
        if self._last_timestep is None or float(t.max()) >= self._last_timestep:
            self.reset()
        self._last_timestep = float(t.max())
        with torch.no_grad():
            return _call(self.model, None, x, t, conditions)
