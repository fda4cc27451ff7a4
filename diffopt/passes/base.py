"""The pass contract and the pipeline that runs passes with verification.

A pass is a frozen dataclass (options as fields) with ``call(program, context) ->
PassResult(program, modified)`` and optional ``requires`` / ``ensures`` checks, after
onnx-ir's pass infrastructure. The ``Pipeline`` runs passes in order, recompiles and verifies the
program after each one (``graph.lint()`` plus the step-program invariants), checks that
``modified`` is truthful, and names the failing pass and the passes before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from diffopt.ir.annotations import META_KEY, NodeAnnotation
from diffopt.ir.graph_tools import output_values, placeholders
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.program import StepProgram
from diffopt.ir.statistics import CalibrationStatistics


class PassError(RuntimeError):
    """A pass failed, broke an invariant, or misreported ``modified``."""


class PassNotApplicable(ValueError):
    """A pass cannot apply to the program it was given; the message says why and what to do."""


class ProgramInvariantError(ValueError):
    """A step program violates the rules every backend relies on."""


@dataclass(frozen=True)
class PassResult:
    program: StepProgram
    modified: bool


@dataclass
class PassContext:
    """What passes may read besides the program: calibration statistics, the per-layer
    policy, example inputs."""

    statistics: CalibrationStatistics | None = None
    policy: LayerPolicy = field(default_factory=LayerPolicy)
    example_inputs: tuple | None = None

    def __post_init__(self) -> None:
        if self.statistics is not None and not isinstance(self.statistics, CalibrationStatistics):
            raise TypeError(
                f"calibration must be the CalibrationStatistics of diffopt.measure.calibration.calibrate "
                f"(or CalibrationStatistics.load(path)), found {type(self.statistics).__name__}"
            )

    def require_statistics(self, pass_name: str) -> CalibrationStatistics:
        if self.statistics is None:
            raise PassNotApplicable(
                f"{pass_name} needs calibration statistics: pass calibration=calibrate(...) "
                f"(diffopt.measure.calibration) or CalibrationStatistics.load(path) to optimize()"
            )
        return self.statistics


class GraphPass:
    """Base of every pass; subclasses are ``@dataclass(frozen=True)``.

    A pass that creates variants names its ``kind`` (``"cache"``, ``"temporal-difference"``)
    and calls ``already_applied`` first: the same pass again changes nothing, another pass
    of the same kind (or a cache after temporal differences) is refused with the reason."""

    kind: ClassVar[str | None] = None  # set by passes that create variants
    after: ClassVar[tuple[str, ...]] = ()  # kinds that must not have been applied before this one

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def needs_calibration(self) -> bool:
        """Whether ``optimize`` needs ``calibration=`` statistics for this pass."""
        return False

    def already_applied(self, program: StepProgram) -> bool:
        """True if this very pass made the program's variants; raise ``PassNotApplicable`` if
        the program cannot take it."""
        if (self.kind, repr(self)) in program.applied:
            return True
        for kind, other in program.applied:
            if kind == self.kind:
                raise PassNotApplicable(
                    f"{self.name} cannot apply: the program already has {kind} variants from "
                    f"{other}; {kind} passes do not stack, so keep one of them"
                )
            if kind in self.after:
                raise PassNotApplicable(
                    f"{self.name} cannot apply after {other}: run {kind} passes after "
                    f"{self.kind} passes (they compose over its variants, not the reverse)"
                )
        return False

    def require_one_variant(self, program: StepProgram) -> None:
        """For passes that make the first variants of a program."""
        if len(program.variants) != 1:
            applied = [other for _, other in program.applied] or "none"
            raise PassNotApplicable(
                f"{self.name} rewrites a program with one variant; this one has "
                f"{sorted(map(str, program.variants))} (variant-creating passes before it: "
                f"{applied}). Run it first."
            )

    def record(self, program: StepProgram) -> StepProgram:
        """``program`` with this pass recorded as applied."""
        return dataclasses.replace(program, applied=(*program.applied, (self.kind, repr(self))))

    def requires(self, program: StepProgram, context: PassContext) -> None:
        """Raise if the program or context is not ready for this pass."""

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, program: StepProgram, context: PassContext) -> None:
        """Raise if the pass did not establish what it promises."""


def verify_program(program: StepProgram) -> None:
    """Check the invariants every backend relies on; raise ``ProgramInvariantError``."""
    expected_inputs = program.num_inputs + len(program.state)
    for name in program.schedule.variants:
        if name not in program.variants:
            raise ProgramInvariantError(
                f"the schedule uses variant {name!r}, but the program only has {sorted(program.variants)}"
            )
    for name, module in program.variants.items():
        graph = module.graph
        graph.lint()
        inputs = placeholders(graph)
        if len(inputs) != expected_inputs:
            raise ProgramInvariantError(
                f"variant {name!r} has {len(inputs)} inputs; expected {expected_inputs} "
                f"({program.num_inputs} model inputs + state {list(program.state.names)})"
            )
        outputs = output_values(graph)
        if len(outputs) != 1 + len(program.state):
            raise ProgramInvariantError(
                f"variant {name!r} returns {len(outputs)} values; expected (out, *new_state) = {1 + len(program.state)}"
            )
        aliased = [getattr(v, "name", v) for v in outputs if getattr(v, "op", None) == "placeholder"]
        if aliased:
            raise ProgramInvariantError(
                f"variant {name!r} returns its inputs {aliased} unchanged; copy them "
                f"(graph_tools.thread_state does) so runtimes never alias buffers"
            )
        for node in graph.nodes:
            annotation = node.meta.get(META_KEY)
            if annotation is not None and not isinstance(annotation, NodeAnnotation):
                raise ProgramInvariantError(
                    f"node {node.name} in variant {name!r} has a {type(annotation).__name__}"
                    f" under meta[{META_KEY!r}]; expected a NodeAnnotation"
                )


@dataclass(frozen=True)
class PassRecord:
    name: str
    modified: bool


class Pipeline:
    """Runs passes in order with verification after each."""

    def __init__(self, passes: Sequence[GraphPass]):
        for p in passes:
            if not isinstance(p, GraphPass):
                raise TypeError(f"expected GraphPass instances, found {type(p).__name__}")
        self.passes = tuple(passes)

    def run(self, program: StepProgram, context: PassContext | None = None) -> tuple[StepProgram, list[PassRecord]]:
        context = context or PassContext()
        records: list[PassRecord] = []
        verify_program(program)
        for index, graph_pass in enumerate(self.passes):
            before = [r.name for r in records]
            where = (
                f"pass {graph_pass.name!r} (#{index + 1} of {len(self.passes)}; passes before it: {before or 'none'})"
            )
            fingerprint = program.fingerprint()
            try:
                graph_pass.requires(program, context)
                result = graph_pass.call(program, context)
                for module in result.program.variants.values():
                    module.recompile()
                verify_program(result.program)
                graph_pass.ensures(result.program, context)
            except Exception as error:
                raise PassError(f"{where} failed: {type(error).__name__}: {error}") from error
            changed = result.program.fingerprint() != fingerprint
            if changed != result.modified:
                raise PassError(
                    f"{where} reported modified={result.modified}, but the program "
                    f"{'changed' if changed else 'did not change'}"
                )
            program = result.program
            records.append(PassRecord(graph_pass.name, result.modified))
        return program, records
