import pytest
import torch
from models import simple_dit

from diffopt import LayerPolicy, PassError, Sampler, capture, make_scheduler, optimize
from diffopt.ir.annotations import annotation_of
from diffopt.ir.graph_tools import module_path
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import AdaptiveSchedule
from diffopt.ir.specs import FULL, PROBE
from diffopt.measure.calibration import calibrate
from diffopt.measure.macs import macs_per_node
from diffopt.passes.increment_calibrated_cache import CALIBRATED, IncrementCalibratedCachePass
from diffopt.passes.low_rank import low_rank_factors, ranks_under_budget

aten = torch.ops.aten
CONFIG = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}
CACHED_LAYERS = ("qkv", "proj", "fc1", "fc2")
LABELS = torch.tensor([1, 5, 9])
SHAPE = (3, 1, 16, 16)


@pytest.fixture(scope="module")
def model_and_graph():
    model = simple_dit(seed=3)
    return model, capture(model, (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))


def _trajectory(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(SHAPE, generator=g), torch.full((3,), 950 - 90 * k)) for k in range(steps)]


def _hooked_reference(model, trajectory, period, rank):
    """Independent eager ICC: forward hooks on the block linears of the eager model."""
    cache, step = {}, {"k": 0}
    handles = []
    for b, block in enumerate(model.blocks):
        for name in CACHED_LAYERS:
            layer = getattr(block, name)
            key = f"{b}.{name}"
            factors = low_rank_factors(layer.weight, rank) if rank else None

            def hook(module, args, output, key=key, factors=factors):
                x = args[0]
                if step["k"] % period == 0:
                    cache[key] = (x, output)
                    return output
                x_c, y_c = cache[key]
                return y_c if factors is None else y_c + (x - x_c) @ factors[1].T @ factors[0].T

            handles.append(layer.register_forward_hook(hook))
    outputs = []
    try:
        with torch.no_grad():
            for x, t in trajectory:
                outputs.append(model(x, t, LABELS))
                step["k"] += 1
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_full_rank_reproduces_the_uncached_model_every_step(model_and_graph):
    model, captured = model_and_graph
    optimized = optimize(captured, [IncrementCalibratedCachePass(rank=None, period=3)])
    state = optimized.init_state(3)
    for k, (x, t) in enumerate(_trajectory(7)):  # fresh inputs every step, full and calibrated alike
        out, state = optimized.step(k, x, t, LABELS, state=state)
        with torch.no_grad():
            expected = model(x, t, LABELS)
        assert float((out - expected).norm() / expected.norm()) < 1e-4, k
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 50), progress=False)
    cached = sampler.sample(optimized, (LABELS,), shape=SHAPE, seed=0)
    exact = sampler.sample(model, (LABELS,), shape=SHAPE, seed=0)
    assert float((cached - exact).norm() / exact.norm()) < 1e-4


def test_adaptive_refresh_follows_the_first_layers_relative_increment(model_and_graph):
    model, captured = model_and_graph
    threshold = 0.05
    optimized = optimize(captured, [IncrementCalibratedCachePass(rank=None, refresh_threshold=threshold)])
    assert optimized.program.schedule == AdaptiveSchedule(PROBE, threshold, FULL, CALIBRATED)
    g = torch.Generator().manual_seed(5)
    x0, direction = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    first_inputs = []  # independent record of the first cached layer's input, by a hook
    handle = model.blocks[0].qkv.register_forward_pre_hook(lambda module, args: first_inputs.append(args[0]))
    variants, expected_variants, reference = [], [], None
    try:
        for k in range(8):
            x, t = x0 + 0.02 * k * direction, torch.full((3,), 900 - 10 * k)
            out = optimized(x, t, LABELS)
            variants.append(optimized.last_variant)
            with torch.no_grad():
                expected = model(x, t, LABELS)
            assert float((out - expected).norm() / expected.norm()) < 1e-4  # full rank: exact on every step
            increment = (
                None
                if reference is None
                else float((first_inputs[-1] - reference).abs().mean() / reference.abs().mean())
            )
            refresh = increment is None or increment > threshold
            expected_variants.append(FULL if refresh else CALIBRATED)
            reference = first_inputs[-1] if refresh else reference
    finally:
        handle.remove()
    assert variants == expected_variants and CALIBRATED in variants and FULL in variants[1:]


@pytest.mark.parametrize("rank", [0, 4])
def test_low_rank_and_plain_reuse_match_an_eager_hook_reference(model_and_graph, rank):
    model, captured = model_and_graph
    optimized = optimize(captured, [IncrementCalibratedCachePass(rank=rank, period=2)])
    trajectory = _trajectory(6)
    expected = _hooked_reference(model, trajectory, period=2, rank=rank)
    for k, (x, t) in enumerate(trajectory):
        got = optimized(x, t, LABELS)
        torch.testing.assert_close(got, expected[k], rtol=1e-4, atol=1e-5)
        if k % 2:  # calibrated steps really differ from the uncached model
            assert not torch.allclose(got, model(x, t, LABELS), rtol=1e-3, atol=1e-3)


def test_structure_state_and_annotations(model_and_graph):
    _, captured = model_and_graph
    optimized = optimize(captured, [IncrementCalibratedCachePass(rank=4, period=2)])
    program = optimized.program
    assert set(program.variants) == {FULL, CALIBRATED}
    wrapped = [f"blocks.{b}.{n}" for b in range(2) for n in CACHED_LAYERS]
    assert program.state.names == tuple(f"{w}.cached_{kind}" for w in wrapped for kind in ("input", "output"))
    calibrated = program.variants[CALIBRATED].graph
    ranks = [
        annotation_of(n).rank
        for n in calibrated.nodes
        if annotation_of(n) is not None and annotation_of(n).mode == CALIBRATED
    ]
    assert ranks == [4] * len(wrapped)
    modulation = [
        annotation_of(n)
        for n in program.variants[FULL].graph.nodes
        if n.target == aten.linear.default and module_path(n) in ("blocks.0.modulation", "blocks.1.modulation")
    ]
    assert len(modulation) == 2 and all(a.mode == "original" and "token-wise" in a.reason for a in modulation)


def test_calibrated_steps_cost_r_times_m_plus_n_per_token(model_and_graph):
    _, captured = model_and_graph
    rank, tokens = 4, 64
    program = optimize(captured, [IncrementCalibratedCachePass(rank=rank)]).program
    inputs = (torch.randn(1, 1, 16, 16), torch.tensor([500]), torch.tensor([3]))
    state = program.state.allocate(1)
    full = sum(macs_per_node(program.variants[FULL], (*inputs, *state)).values())
    calibrated = sum(macs_per_node(program.variants[CALIBRATED], (*inputs, *state)).values())
    hidden = 32
    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]
    saved = 2 * sum(tokens * (m * n - rank * (m + n)) for m, n in shapes)  # 2 blocks
    assert full - calibrated == saved


def test_ranks_under_a_mac_budget_follow_the_spectrum_and_respect_the_budget():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(48, 2, generator=g) @ torch.randn(2, 32, generator=g)  # energy in 2 directions
    spread = torch.randn(48, 32, generator=g)  # energy in all 32
    assert ranks_under_budget([(low_rank, None, None), (spread, None, None)], 0.05) == [1, 0]  # room for one
    for budget in (0.2, 0.5):
        ranks = ranks_under_budget([(low_rank, None, None), (spread, None, None)], budget)
        assert sum(r * (48 + 32) for r in ranks) <= budget * 2 * 48 * 32
        assert ranks[0] == 2 < ranks[1]  # nothing is spent past the low-rank layer's 2 directions
    with pytest.raises(ValueError, match="fraction"):
        ranks_under_budget([(spread, None, None)], 1.5)


def test_icc_under_a_mac_budget_spends_at_most_the_budget(model_and_graph):
    _, captured = model_and_graph
    budget = 0.25
    program = optimize(captured, [IncrementCalibratedCachePass(mac_budget=budget)]).program
    ranks = {
        annotation_of(n).details["layer"]: annotation_of(n).rank
        for n in program.variants[CALIBRATED].graph.nodes
        if annotation_of(n) is not None and annotation_of(n).mode == CALIBRATED
    }
    hidden = 32
    shapes = {
        "qkv": (3 * hidden, hidden),
        "proj": (hidden, hidden),
        "fc1": (4 * hidden, hidden),
        "fc2": (hidden, 4 * hidden),
    }
    spent = sum(rank * sum(shapes[layer.rsplit(".", 1)[1]]) for layer, rank in ranks.items())
    full = 2 * sum(m * n for m, n in shapes.values())
    assert len(ranks) == 8 and len(set(ranks.values())) > 1  # per-layer choices
    assert budget * full * 0.9 < spent <= budget * full


def test_second_run_changes_nothing_and_a_pass_that_cannot_apply_says_why(model_and_graph):
    _, captured = model_and_graph
    once = optimize(captured, [IncrementCalibratedCachePass()])
    twice = optimize(once.program, [IncrementCalibratedCachePass()])
    assert twice.pass_records[0].modified is False
    with pytest.raises(PassError, match="already has cache variants from IncrementCalibratedCachePass"):
        optimize(once.program, [IncrementCalibratedCachePass(rank=4)])

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x, t):
            return self.inner(x) * t[:, None, None]

    with pytest.raises(PassError, match="no token-wise linear layer in blocks"):
        optimize(NoBlocks(), [IncrementCalibratedCachePass()], example_inputs=(torch.randn(2, 3, 4), torch.ones(2)))


def test_policy_excludes_layers_with_a_reason(model_and_graph):
    _, captured = model_and_graph
    policy = LayerPolicy(
        module_patterns=[(r"blocks\.\d+\.fc\d", {"cache": False})], exact_names={"blocks.1.qkv": {"rank": 2}}
    )
    program = optimize(captured, [IncrementCalibratedCachePass(rank=4)], policy=policy).program
    assert not any("fc" in name for name in program.state.names)
    reasons = {
        annotation_of(n).reason
        for n in program.variants[FULL].graph.nodes
        if annotation_of(n) is not None and annotation_of(n).mode == "original"
    }
    assert "excluded by the layer policy" in reasons
    ranks = {
        annotation_of(n).details["layer"]: annotation_of(n).rank
        for n in program.variants[CALIBRATED].graph.nodes
        if annotation_of(n) is not None and annotation_of(n).mode == CALIBRATED
    }
    assert ranks == {"blocks.0.qkv": 4, "blocks.0.proj": 4, "blocks.1.qkv": 2, "blocks.1.proj": 4}


def test_channel_aware_factorisation_needs_and_uses_calibration(model_and_graph):
    model, captured = model_and_graph
    with pytest.raises(PassError, match="calibration"):
        optimize(captured, [IncrementCalibratedCachePass(factorization="channel-aware")])
    program = StepProgram.from_captured(captured)
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 6), progress=False)
    statistics = calibrate(program, sampler, (LABELS,), SHAPE, seeds=(0,))
    counts = statistics.activations.counts["blocks.0.fc2"]
    assert counts["input"] == 6 * 3 and counts["increment"] == 5 * 3 and counts["output"] == 6 * 3
    optimized = optimize(
        captured, [IncrementCalibratedCachePass(rank=8, factorization="channel-aware")], calibration=statistics
    )
    assert optimized.pass_records[0].modified


def test_channel_statistics_match_an_independent_hook_on_the_eager_model(model_and_graph):
    model, captured = model_and_graph
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 3), progress=False)
    statistics = calibrate(StepProgram.from_captured(captured), sampler, (LABELS,), SHAPE, progress=False)
    seen = []
    handle = model.blocks[1].qkv.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        sampler.sample(model, (LABELS,), shape=SHAPE, seed=0)
    finally:
        handle.remove()
    magnitudes = []
    for x in seen:  # per sample: mean |x| over tokens, min-max normalised over channels
        magnitude = x.abs().mean(1).double()
        low, high = magnitude.min(1, keepdim=True).values, magnitude.max(1, keepdim=True).values
        magnitudes.append((magnitude - low) / (high - low))
    expected = torch.cat(magnitudes).mean(0).sqrt()
    expected = expected.clamp_min(float(expected.max()) / 1000)
    torch.testing.assert_close(statistics.activations.channel_weights("blocks.1.qkv", "input"), expected)


def test_channel_aware_svd_minimises_the_weighted_error():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=g)
    left, right = torch.rand(24, generator=g) + 0.1, torch.rand(16, generator=g) + 0.1
    a, b = low_rank_factors(weight, 16)
    torch.testing.assert_close(a @ b, weight, rtol=1e-5, atol=1e-5)  # full rank is exact

    def weighted_error(factors):
        return float((left[:, None] * (weight - factors[0] @ factors[1]) * right[None]).norm())

    aware, plain = low_rank_factors(weight, 4, right, left), low_rank_factors(weight, 4)
    assert weighted_error(aware) < weighted_error(plain)


def test_torch_backend_carries_unchanged_caches_without_copies(model_and_graph):
    _, graph = model_and_graph
    optimized = optimize(graph, [IncrementCalibratedCachePass(rank=4, period=2)])
    program = optimized.program
    calibrated_outputs = program.variants[CALIBRATED].graph.output_node().args[0][1:]
    assert all(v.target == aten.clone.default for v in calibrated_outputs)  # the program itself copies
    state = optimized.init_state(3)
    x, t = torch.randn(SHAPE), torch.full((3,), 500)
    _, state = optimized.step(0, x, t, LABELS, state=state)
    out, carried = optimized.step(1, x, t, LABELS, state=state)
    assert optimized.last_variant == CALIBRATED
    assert all(new is old for new, old in zip(carried, state))  # the backend hands the same tensors on
    with torch.no_grad():
        expected, *copied = program.variants[CALIBRATED](x, t, LABELS, *state)  # the graph as the program holds it
    assert torch.equal(out, expected) and all(torch.equal(a, b) for a, b in zip(carried, copied))


def test_query_key_and_value_share_one_cached_input():
    from models import diffusers_dit, inputs_for

    graph = capture(diffusers_dit(seed=1), inputs_for("diffusers_dit", 2, seed=0))
    names = optimize(graph, [IncrementCalibratedCachePass(rank=4, period=2)]).program.state.names
    attention = [n for n in names if ".attn1." in n and n.startswith("transformer_blocks.0.")]
    assert attention == ["transformer_blocks.0.attn1.to_q.cached_input"] + [
        f"transformer_blocks.0.attn1.{layer}.cached_output" for layer in ("to_q", "to_k", "to_v")
    ] + ["transformer_blocks.0.attn1.to_out.0.cached_input", "transformer_blocks.0.attn1.to_out.0.cached_output"]
