"""The pass contract and the pipeline that runs passes with verification.

A pass is a frozen dataclass (options as fields) with ``call(program, context) ->
PassResult(program, modified)`` and optional ``requires`` / ``ensures`` checks, after
onnx-ir's pass infrastructure. The ``Pipeline`` runs passes in order, recompiles and verifies the
program after each one (``graph.lint()`` plus the step-program invariants), checks that
``modified`` is truthful, and names the failing pass and the passes before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from diffopt.annotations import META_KEY, NodeAnnotation
from diffopt.graph_tools import output_values, placeholders
from diffopt.policy import LayerPolicy
from diffopt.program import FULL, StepProgram


class PassError(RuntimeError):
    """A pass failed, broke an invariant, or misreported ``modified``."""


class ProgramInvariantError(ValueError):
    """A step program violates the rules every backend relies on."""


@dataclass(frozen=True)
class PassResult:
    program: StepProgram
    modified: bool


@dataclass
class PassContext:
    """What passes may read besides the program: calibration, the per-layer policy, inputs."""

    calibration: Any = None
    policy: LayerPolicy = field(default_factory=LayerPolicy)
    example_inputs: tuple | None = None


class GraphPass:
    """Base of every pass; subclasses are ``@dataclass(frozen=True)``."""

    @property
    def name(self) -> str:
        return type(self).__name__

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
            raise ProgramInvariantError(f"the schedule uses variant {name!r}, but the program only has "
                                        f"{sorted(program.variants)}")
    for name, module in program.variants.items():
        graph = module.graph
        graph.lint()
        inputs = placeholders(graph)
        if len(inputs) != expected_inputs:
            raise ProgramInvariantError(f"variant {name!r} has {len(inputs)} inputs; expected {expected_inputs} "
                                        f"({program.num_inputs} model inputs + state {list(program.state.names)})")
        outputs = output_values(graph)
        if len(outputs) != 1 + len(program.state):
            raise ProgramInvariantError(f"variant {name!r} returns {len(outputs)} values; expected "
                                        f"(out, *new_state) = {1 + len(program.state)}")
        aliased = [getattr(v, "name", v) for v in outputs if getattr(v, "op", None) == "placeholder"]
        if aliased:
            raise ProgramInvariantError(f"variant {name!r} returns its inputs {aliased} unchanged; copy them "
                                        f"(graph_tools.thread_state does) so runtimes never alias buffers")
        for node in graph.nodes:
            annotation = node.meta.get(META_KEY)
            if annotation is not None and not isinstance(annotation, NodeAnnotation):
                raise ProgramInvariantError(f"node {node.name} in variant {name!r} has a {type(annotation).__name__}"
                                            f" under meta[{META_KEY!r}]; expected a NodeAnnotation")


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
            where = (f"pass {graph_pass.name!r} (#{index + 1} of {len(self.passes)}; "
                     f"passes before it: {before or 'none'})")
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
                raise PassError(f"{where} reported modified={result.modified}, but the program "
                                f"{'changed' if changed else 'did not change'}")
            program = result.program
            records.append(PassRecord(graph_pass.name, result.modified))
        return program, records


def require_single_variant(pass_name: str, program: StepProgram) -> None:
    """For passes that turn the ``full`` graph into variants: refuse programs that already have some."""
    if set(program.variants) != {FULL}:
        raise ValueError(f"{pass_name} rewrites a single-variant program ({FULL!r}); this one has "
                         f"{sorted(program.variants)}. Run it on the captured model, before passes that add variants.")
