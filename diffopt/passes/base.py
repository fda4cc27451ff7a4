"""The pass contract and the pipeline that runs passes with verification.

A pass is a frozen dataclass (options as fields) with ``call(program, context) ->
PassResult(program, modified)`` and optional ``requires`` / ``ensures`` checks, after
onnx-ir's pass infrastructure. A pass that makes variants derives from ``VariantPass`` and
writes only ``rewrite(program, context) -> program``: the template refuses programs that
cannot take it and records it. A pass is its parameters (``identity``), and says whether it
edits the program it is given (``in_place``).

The ``Pipeline`` runs passes in order (on a copy of the program for an ``in_place`` pass, so
a pass that fails halfway leaves nothing half-edited), recompiles and verifies the program
after each one (``graph.lint()`` plus the step-program invariants), checks that ``modified``
is truthful, and names the failing pass and the passes before it. A pass that does not
apply reaches the caller as ``PassNotApplicable`` (``PassNotApplicableError``, also a
``PassError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffopt.ir.annotations import META_KEY, NodeAnnotation
from diffopt.ir.graph_tools import output_values, placeholders
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.program import StepProgram
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.util.validation import register_word


class PassError(RuntimeError):
    """A pass failed, broke an invariant, or misreported ``modified``."""


class PassNotApplicable(ValueError):
    """A pass cannot apply to the program it was given; the message says why and what to do."""


class PassNotApplicableError(PassError, PassNotApplicable):
    """``PassNotApplicable`` raised inside a ``Pipeline``, with where it happened."""


PASS_KINDS: set[str] = set()  # the registered kinds; a plugin's pass registers its own


def register_pass_kind(name: str) -> str:
    """Register the pass kind ``name`` (a lowercase word, ``-`` allowed) and return it."""
    return register_word(PASS_KINDS, name, "a pass kind")


class PassKind:
    """The built-in pass kinds: what a variant-creating pass does, as an open, registered name
    (``register_pass_kind``); one pass of each kind per program, in an order
    (``GraphPass.after``)."""

    CACHE = register_pass_kind("cache")
    TEMPORAL_DIFFERENCE = register_pass_kind("temporal-difference")
    LENGTH = register_pass_kind("length")


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

    A pass that creates variants names its ``kind`` and calls ``already_applied`` first
    (``VariantPass`` does it): the same pass again changes nothing, another pass of the same
    kind (or a cache after temporal differences) is refused with the reason."""

    kind: ClassVar[str | None] = None  # set by passes that create variants: a registered kind (PassKind's, or new)
    after: ClassVar[tuple[str, ...]] = ()  # kinds that must not have been applied before this one
    in_place: ClassVar[bool] = True  # call() may edit the program it is given: the Pipeline gives it a copy

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def identity(self) -> str:
        """The pass as its class and parameters (tensors by dtype, shape and a hash of their
        values): two passes are the same pass exactly when these are equal."""
        if not dataclasses.is_dataclass(self):
            return self.name
        options = ", ".join(f"{f.name}={_identity(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{self.name}({options})"

    @property
    def needs_calibration(self) -> bool:
        """Whether ``optimize`` needs ``calibration=`` statistics for this pass."""
        return False

    def already_applied(self, program: StepProgram) -> bool:
        """True if this very pass made the program's variants; raise ``PassNotApplicable`` if
        the program cannot take it."""
        if (self.kind, self.identity) in program.applied:
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
        return dataclasses.replace(program, applied=(*program.applied, (self.kind, self.identity)))

    def requires(self, program: StepProgram, context: PassContext) -> None:
        """Raise if the program or context is not ready for this pass: by default, when it
        ``needs_calibration`` and the context has no statistics."""
        if self.needs_calibration:
            context.require_statistics(self.name)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError``, naming this pass and its setting, when a setting cannot fit
        ``model``'s module tree (e.g. a chain or block it names): ``enable`` calls it before
        any capture. By default there is nothing to check."""

    def __call__(self, program: StepProgram, context: PassContext | None = None) -> PassResult:
        """This pass alone, with what ``Pipeline.run`` gives every pass: a copy of ``program``
        to edit, verification after it, a truthful ``modified``."""
        return run_checked(self, program, context or PassContext(), f"pass {self.name!r}")

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, program: StepProgram, context: PassContext) -> None:
        """Raise if the pass did not establish what it promises."""


class VariantPass(GraphPass):
    """A pass that makes variants: ``call`` returns the program unchanged if this very pass
    made it, refuses programs that cannot take it (another pass of its kind, a kind that must
    come later, several variants where ``first_variants``), runs ``rewrite`` and records the
    pass. ``rewrite`` returns the rewritten program, or None when there is nothing to rewrite
    (the result is modified only if the program's fingerprint changed, e.g. annotations)."""

    first_variants: ClassVar[bool] = True  # rewrites a one-variant program (its variants are the first)

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        if self.already_applied(program):
            return PassResult(program, False)
        if self.first_variants:
            self.require_one_variant(program)
        before = program.fingerprint()
        rewritten = self.rewrite(program, context)
        if rewritten is None:
            return PassResult(program, program.fingerprint() != before)
        return PassResult(self.record(rewritten), True)

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram | None:
        raise NotImplementedError


def _identity(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return f"tensor({str(data.dtype).removeprefix('torch.')}, {list(data.shape)}, sha256={digest[:16]})"
    if isinstance(value, GraphPass):
        return value.identity
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_identity(item) for item in value) + ")"
    return repr(value)


PASS_TYPES: dict[str, type[GraphPass]] = {}  # what pass files may name: every @register_pass class


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: ``cls`` can be named in pass files (``passes.registry``) and bench
    files by its class name; its options must be numbers, strings, None or lists of them."""
    if not (isinstance(cls, type) and issubclass(cls, GraphPass) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_pass takes a GraphPass dataclass, found {cls!r}")
    unknown = sorted({kind for kind in (cls.kind, *cls.after) if kind is not None} - PASS_KINDS)
    if unknown:
        raise ValueError(
            f"{cls.__name__}: pass kinds {unknown} are not registered (register_pass_kind); known: {sorted(PASS_KINDS)}"
        )
    known = PASS_TYPES.get(cls.__name__)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"a pass named {cls.__name__} is registered already ({known.__module__})")
    PASS_TYPES[cls.__name__] = cls
    return cls


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


def pass_list(passes: Sequence[GraphPass]) -> tuple[GraphPass, ...]:
    """``passes`` as a tuple of ``GraphPass`` instances; a single pass or anything else is a
    ``TypeError`` that says what to write."""
    if isinstance(passes, GraphPass):
        raise TypeError(f"passes is a list of passes, found one pass: write passes=[{passes!r}]")
    if isinstance(passes, (str, bytes, dict)) or not isinstance(passes, (list, tuple)):
        raise TypeError(f"passes is a list of GraphPass instances, found {type(passes).__name__} {passes!r:.60}")
    for item in passes:
        if not isinstance(item, GraphPass):
            raise TypeError(f"passes holds GraphPass instances, found {type(item).__name__}: {item!r:.60}")
    return tuple(passes)


def run_checked(graph_pass: GraphPass, program: StepProgram, context: PassContext, where: str) -> PassResult:
    """``graph_pass`` on ``program`` (a copy, for an ``in_place`` pass) with its checks: its
    ``requires``, the program recompiled and verified after it, its ``ensures``, and
    ``modified`` checked against the fingerprint; failures name ``where``."""
    fingerprint = program.fingerprint()
    given = program.copy() if graph_pass.in_place else program
    try:
        graph_pass.requires(given, context)
        result = graph_pass.call(given, context)
        for module in result.program.variants.values():
            module.recompile()
        verify_program(result.program)
        graph_pass.ensures(result.program, context)
    except PassNotApplicable as error:
        raise PassNotApplicableError(f"{where} does not apply: {error}") from error
    except Exception as error:
        raise PassError(f"{where} failed: {type(error).__name__}: {error}") from error
    changed = result.program.fingerprint() != fingerprint
    if not result.modified and not changed:
        return PassResult(program, False)  # unchanged: keep the graphs the caller gave (no copy)
    if changed != result.modified:
        raise PassError(
            f"{where} reported modified={result.modified}, but the program {'changed' if changed else 'did not change'}"
        )
    return result


class Pipeline(GraphPass):
    """Runs passes in order with verification after each (``run_checked``). A pipeline is a
    pass too, so pipelines nest: ``Pipeline([a, Pipeline([b, c])])`` runs a, b, c."""

    in_place: ClassVar[bool] = False  # each pass inside gets its own copy

    def __init__(self, passes: Sequence[GraphPass]):
        self.passes = pass_list(passes)

    @property
    def identity(self) -> str:
        return f"Pipeline({', '.join(p.identity for p in self.passes)})"

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    def check_model(self, model: torch.nn.Module) -> None:
        for graph_pass in self.passes:
            graph_pass.check_model(model)

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        result, records = self.run(program, context)
        return PassResult(result, any(record.modified for record in records))

    def run(self, program: StepProgram, context: PassContext | None = None) -> tuple[StepProgram, list[PassRecord]]:
        context = context or PassContext()
        records: list[PassRecord] = []
        verify_program(program)
        for index, graph_pass in enumerate(self.passes):
            before = [r.name for r in records]
            where = (
                f"pass {graph_pass.name!r} (#{index + 1} of {len(self.passes)}; passes before it: {before or 'none'})"
            )
            result = run_checked(graph_pass, program, context, where)
            program = result.program
            records.append(PassRecord(graph_pass.name, result.modified))
        return program, records
