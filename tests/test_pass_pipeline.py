import dataclasses
from dataclasses import dataclass

import pytest
import torch
from models import simple_dit
from toy_passes import CarryActivationPass, StepCounterPass

from diffopt import LayerPolicy, PassError, Pipeline, StepProgram, capture, optimize
from diffopt.ir.annotations import NodeAnnotation, annotate, annotation_of
from diffopt.ir.graph_tools import module_path, op_type
from diffopt.ir.specs import FULL
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.passes.base import GraphPass, PassResult

aten = torch.ops.aten


@dataclass(frozen=True)
class AnnotateLinearsPass(GraphPass):
    """Marks every linear node with a policy-chosen mode; modified only if a mark changed."""

    def call(self, program, context):
        modified = False
        nodes = [n for module in program.variants.values() for n in module.graph.nodes]
        for node in nodes:
            if node.target != aten.linear.default:
                continue
            mode = context.policy.resolve(module_path(node), op_type(node)).get("mode", "original")
            current = annotation_of(node)
            if current is None or current.mode != mode:
                annotate(node, NodeAnnotation(mode=mode, owner=self.name, reason="policy"))
                modified = True
        return PassResult(program, modified)


@dataclass(frozen=True)
class LyingPass(GraphPass):
    claim: bool = False

    def call(self, program, context):
        if not self.claim:  # changes the graph but says it did not
            node = next(n for n in program.variants[FULL].graph.nodes if n.target == aten.linear.default)
            annotate(node, NodeAnnotation(mode="x", owner=self.name))
        return PassResult(program, self.claim)


@dataclass(frozen=True)
class ExplodingPass(GraphPass):
    def call(self, program, context):
        raise RuntimeError("boom")


@dataclass(frozen=True)
class AliasingPass(GraphPass):
    """Returns an input as an output: a program every runtime would mis-run."""

    def call(self, program, context):
        graph = program.variants[FULL].graph
        x = next(n for n in graph.nodes if n.op == "placeholder")
        graph.output_node().args = ((x,),)
        return PassResult(program, True)


@dataclass(frozen=True)
class NeedsCalibrationPass(GraphPass):
    def requires(self, program, context):
        context.require_statistics(self.name)

    def call(self, program, context):
        return PassResult(program, False)


def _program() -> StepProgram:
    model = simple_dit()
    return StepProgram.from_captured(
        capture(model, (torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])))
    )


@pytest.mark.parametrize("graph_pass", [AnnotateLinearsPass(), CarryActivationPass(), StepCounterPass()])
def test_modified_is_exact_and_second_run_changes_nothing(graph_pass):
    program, records = Pipeline([graph_pass]).run(_program())
    assert records[0].modified is True
    program, records = Pipeline([graph_pass]).run(program)
    assert records[0].modified is False


def test_pipeline_catches_a_pass_that_misreports_modified():
    with pytest.raises(PassError, match="reported modified=False, but the program changed"):
        Pipeline([LyingPass(claim=False)]).run(_program())
    with pytest.raises(PassError, match="reported modified=True, but the program did not change"):
        Pipeline([LyingPass(claim=True)]).run(_program())


def test_failing_pass_error_names_it_and_the_passes_before_it():
    with pytest.raises(PassError) as info:
        Pipeline([StepCounterPass(), AnnotateLinearsPass(), ExplodingPass()]).run(_program())
    message = str(info.value)
    assert "'ExplodingPass' (#3 of 3" in message
    assert "['StepCounterPass', 'AnnotateLinearsPass']" in message
    assert "boom" in message


def test_invariant_violation_after_a_pass_is_reported():
    with pytest.raises(PassError, match="returns its inputs"):
        Pipeline([AliasingPass()]).run(_program())


def test_requires_is_checked_before_the_pass_runs():
    with pytest.raises(PassError, match="NeedsCalibrationPass needs calibration statistics"):
        optimize(_program(), [NeedsCalibrationPass()])
    with pytest.raises(TypeError, match="calibration must be the CalibrationStatistics"):
        optimize(_program(), [NeedsCalibrationPass()], calibration={"ready": True})
    optimize(_program(), [NeedsCalibrationPass()], calibration=CalibrationStatistics())


def test_non_pass_objects_are_rejected():
    with pytest.raises(TypeError, match="GraphPass"):
        Pipeline([lambda program: program])


def test_optimize_leaves_its_input_untouched():
    program = _program()
    before = program.fingerprint()
    optimize(program, [CarryActivationPass(), AnnotateLinearsPass()])
    assert program.fingerprint() == before


def test_policy_precedence_global_optype_regex_exact():
    policy = LayerPolicy(
        global_settings={"mode": "delta", "bits": 8},
        op_types={"linear": {"bits": 4}},
        module_patterns=[(r"blocks\.\d+\.fc\d", {"mode": "full"}), (r"blocks\.1\..*", {"bits": 2})],
        exact_names={"blocks.1.fc2": {"mode": "delta"}},
    )
    assert policy.resolve("head", "conv2d") == {"mode": "delta", "bits": 8}
    assert policy.resolve("head", "linear") == {"mode": "delta", "bits": 4}
    assert policy.resolve("blocks.0.fc1", "linear") == {"mode": "full", "bits": 4}
    assert policy.resolve("blocks.1.fc1", "linear") == {"mode": "full", "bits": 2}
    assert policy.resolve("blocks.1.fc2", "linear") == {"mode": "delta", "bits": 2}
    with pytest.raises(ValueError, match="invalid module-name pattern"):
        LayerPolicy(module_patterns=[("(", {})])


def test_annotations_follow_the_policy_through_optimize():
    policy = LayerPolicy(global_settings={"mode": "delta"}, module_patterns=[(r".*\.fc2", {"mode": "full"})])
    optimized = optimize(_program(), [AnnotateLinearsPass()], policy=policy)
    modes = {
        module_path(n): annotation_of(n).mode
        for n in optimized.program.variants[FULL].graph.nodes
        if annotation_of(n) is not None
    }
    assert modes["blocks.0.fc2"] == "full" and modes["blocks.0.fc1"] == "delta"
    assert optimized.pass_records[0].modified
    assert dataclasses.is_dataclass(
        annotation_of(
            next(iter(n for n in optimized.program.variants[FULL].graph.nodes if annotation_of(n) is not None))
        )
    )


@dataclass(frozen=True)
class DeclaresCalibrationPass(GraphPass):
    """Declares its need once (``needs_calibration``); the base class derives ``requires``."""

    needs_calibration = True

    def call(self, program, context):
        return PassResult(program, False)


def test_requires_is_derived_from_needs_calibration():
    with pytest.raises(PassError, match="DeclaresCalibrationPass needs calibration statistics"):
        optimize(_program(), [DeclaresCalibrationPass()])
    optimize(_program(), [DeclaresCalibrationPass()], calibration=CalibrationStatistics())


def test_a_pass_runs_on_its_own_with_the_pipelines_copy_and_checks():
    program = _program()
    before = program.fingerprint()
    result = StepCounterPass()(program)
    assert result.modified and result.program.fingerprint() != before
    assert program.fingerprint() == before  # it edited a copy
    assert StepCounterPass()(result.program).modified is False  # the same pass again changes nothing
    with pytest.raises(PassError, match="pass 'AliasingPass' failed: .*returns its inputs"):
        AliasingPass()(program)  # verified like inside a pipeline
    assert program.fingerprint() == before


def test_pipelines_nest_and_equal_the_flat_pipeline():
    flat, flat_records = Pipeline([StepCounterPass(), AnnotateLinearsPass()]).run(_program())
    nested, records = Pipeline([StepCounterPass(), Pipeline([AnnotateLinearsPass()])]).run(_program())
    assert nested.fingerprint() == flat.fingerprint()
    assert [r.modified for r in records] == [r.modified for r in flat_records] == [True, True]
    assert records[1].name == "Pipeline"
    with pytest.raises(PassError, match="'AliasingPass' \\(#1 of 1.*returns its inputs"):
        Pipeline([Pipeline([AliasingPass()])]).run(_program())
