"""The pass contract: a new pass is one class (``VariantPass`` + ``@register_pass``) usable
from ``optimize``, a pass file and ``diffopt bench`` with no edit elsewhere; passes get a copy
of the program to edit; ``PassNotApplicable`` reaches the caller as itself; a pass is its
parameters."""

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from models import dit_pipeline, simple_dit
from test_pipeline_cli import _save
from test_pipelines import CASES

import diffopt
from diffopt import capture, optimize
from diffopt.cli import main
from diffopt.ir.graph_tools import add_variant, output_values, remove_dead_code, state_shape, thread_state
from diffopt.ir.schedules import Schedule
from diffopt.ir.specs import CACHED, FULL, StateEntry
from diffopt.passes.base import (
    GraphPass,
    PassError,
    PassKind,
    PassNotApplicable,
    PassResult,
    VariantPass,
    register_pass,
)
from diffopt.passes.block_cache import BlockCachePass
from diffopt.passes.length_shortcut import LengthShortcutPass
from diffopt.passes.registry import load_passes, save_passes
from diffopt.pipelines.component import OptimizedComponent


@register_pass
@dataclass(frozen=True)
class ToyOutputCachePass(VariantPass):
    """Every ``period``-th step runs the model; the steps between return its last output."""

    kind = PassKind.CACHE
    period: int = 2

    def rewrite(self, program, context):
        add_variant(program, CACHED, copy_of=FULL)
        out = output_values(program.variants[FULL].graph)[0]
        entry = StateEntry("toy.last_output", state_shape(out), out.meta["val"].dtype, self.name)

        def update(variant, graph, state_input):
            output = output_values(graph)[0]
            if variant == FULL:
                return output
            with graph.inserting_before(graph.output_node()):
                reused = graph.call_function(torch.ops.aten.clone.default, (state_input,))  # outputs never alias inputs
            graph.output_node().args = ((reused, *output_values(graph)[1:]),)
            return state_input

        program = thread_state(program, entry, update)
        remove_dead_code(program.variants[CACHED])
        return dataclasses.replace(program, schedule=Schedule(FULL, CACHED, self.period))


def _graph():
    return capture(simple_dit(), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))


def test_a_pass_written_against_the_contract_runs_from_optimize_a_pass_file_and_bench(tmp_path, capsys):
    graph = _graph()
    toy = optimize(graph, [ToyOutputCachePass(period=2)])
    plain = optimize(graph)
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 4])
    first, state = toy.step(0, x, torch.tensor([900, 900]), labels, state=toy.init_state(2))
    second, _ = toy.step(1, torch.randn(2, 1, 16, 16), torch.tensor([800, 800]), labels, state=state)
    assert toy.last_variant == CACHED and torch.equal(second, first)  # the cached step returned the last output
    torch.testing.assert_close(first, plain.step(0, x, torch.tensor([900, 900]), labels)[0])
    assert (
        optimize(graph, [ToyOutputCachePass(period=2), ToyOutputCachePass(period=2)]).pass_records[1].modified is False
    )

    save_passes(tmp_path / "toy.passes.json", [ToyOutputCachePass(period=3)])
    passes, _ = load_passes(tmp_path / "toy.passes.json")
    assert passes == [ToyOutputCachePass(period=3)]

    directory = _save(CASES["DiTPipeline"].build, tmp_path / "pipe")
    (tmp_path / "calls.json").write_text(json.dumps([{"class_labels": [1, 2], "guidance_scale": 1.0, "seed": 0}]))
    configurations = [{"name": "toy p2", "passes": [{"pass": "ToyOutputCachePass", "period": 2}], "steps": 4}]
    (tmp_path / "bench.json").write_text(json.dumps({"configurations": configurations}))
    main(
        ["bench", str(tmp_path / "bench.json"), "--pipeline", str(directory), "--calls", str(tmp_path / "calls.json")]
        + ["--steps", "4", "--repeats", "1", "--out", str(tmp_path / "bench")]
    )
    rows = json.loads((tmp_path / "bench").with_suffix(".json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["unmodified", "toy p2"]  # the plain pipeline is the reference
    assert rows[1]["mac_fraction"] == pytest.approx(0.5)  # 2 of 4 steps ran the model


@dataclass(frozen=True)
class _EditsThenFails(GraphPass):
    def call(self, program, context):
        add_variant(program, "half-done", copy_of=FULL)
        program.variants[FULL].graph.output_node().args = ((),)  # and breaks the graph
        raise RuntimeError("failed halfway")


@dataclass(frozen=True)
class _ClaimsNoChange(GraphPass):
    def call(self, program, context):
        return PassResult(program, False)


def test_a_pass_that_fails_halfway_leaves_the_program_it_was_given_unchanged():
    program = optimize(_graph()).program
    before = program.fingerprint()
    with pytest.raises(PassError, match="failed halfway"):
        optimize(program, [_EditsThenFails()])
    assert program.fingerprint() == before and list(program.variants) == [FULL]
    assert optimize(program, [_ClaimsNoChange()]).pass_records[0].modified is False


def test_pass_not_applicable_reaches_the_caller_as_itself():
    graph = _graph()
    with pytest.raises(PassNotApplicable, match="already has cache variants") as raised:
        optimize(graph, [BlockCachePass(period=2), BlockCachePass(period=3)])
    assert isinstance(raised.value, PassError)  # and as the pipeline's error, with where it happened
    assert "#2 of 2" in str(raised.value)


def test_a_pass_is_its_parameters():
    one, other = torch.zeros(4, 8), torch.zeros(4, 8)
    other[0, 0] = 1.0
    same = LengthShortcutPass(group_size=2, length_embedding=one.clone())
    assert LengthShortcutPass(group_size=2, length_embedding=one).identity == same.identity
    assert LengthShortcutPass(group_size=2, length_embedding=other).identity != same.identity
    assert BlockCachePass(period=2).identity == "BlockCachePass(blocks=None, period=2)"
    assert PassKind.CACHE == "cache" and f"{PassKind.TEMPORAL_DIFFERENCE}" == "temporal-difference"


@dataclass(frozen=True)
class _WantsAModule(ToyOutputCachePass):
    """A pass whose setting names a module: its ``check_model`` hook refuses a model without it."""

    module: str = "no_such_module"

    def check_model(self, model):
        if self.module not in dict(model.named_modules()):
            raise ValueError(f"{self.name}: module {self.module!r} is not in {type(model).__name__}")


def test_enable_asks_each_pass_whether_it_fits_the_model_before_any_capture():
    pipe = dit_pipeline()
    with pytest.raises(ValueError, match="_WantsAModule: module 'no_such_module' is not in"):
        diffopt.enable(pipe, [_WantsAModule()])
    assert not isinstance(pipe.transformer, OptimizedComponent)  # nothing was installed
    diffopt.enable(pipe, [_WantsAModule(module="transformer_blocks.0")])
    assert isinstance(pipe.transformer, OptimizedComponent)
    diffopt.disable(pipe)
