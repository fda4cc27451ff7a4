"""Samplers: the loops that drive a denoiser over a noise schedule, on top of ``runtime``.

``sequential.Sampler`` (one step after another: DDPM, DDIM, flow-matching Euler and
diffusers' schedulers, with classifier-free guidance), ``flow_map.FlowMapSampler`` (few-step
flow maps) and ``speculative.SpeculativeSampler`` (parallel drafts of future steps, checked
by the model), each a ``interface.SamplingLoop``: one ``sample(denoiser, conditions, *,
shape, noise, seed)`` signature.
"""
