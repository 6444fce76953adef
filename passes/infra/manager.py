"""Run a pipeline of passes over a model, with verification, print-after-change and a report.

``run_pipeline`` builds every pass first (so a bad option fails before the graph is
touched), runs them in order through onnx-ir's ``PassBase.__call__`` (``requires``, ``call``,
``ensures``), optionally verifies the graph after each pass that changed it, calls
``after_change(index, name, model)`` after each such pass (tools/ writes the dumps), and
records provenance in ``model.metadata_props``:

- ``contract.PIPELINE``: the canonical pipeline text, appended after ``,`` to the pipeline
  of an earlier compile;
- ``contract.PASS_STATS``: a JSON list of ``{"pass", "modified", "stats"}``, appended to
  the list of an earlier compile (read back with ``core.records.pass_records``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.records import pass_records
from pangu_light.passes.infra.base import PanguPass
from pangu_light.passes.infra.pipeline import PassSpec, Pipeline, format_value
from pangu_light.passes.infra.registry import Registry, build_pass
from pangu_light.passes.infra.verify import verify_model

__all__ = [
    "PassRecord",
    "PipelineReport",
    "run_passes",
    "run_pipeline",
]

# The keys live in core.contract; these two names remain only until tests/reference.py and
# tests/tools/test_diff_cmd.py import them from there (the lead moves those callers).

AfterChange = Callable[[int, str, ir.Model], None]


@dataclasses.dataclass
class PassRecord:
    """What one pass did: its spec, whether it changed the model, its counters, its time."""

    spec: PassSpec
    modified: bool
    stats: dict[str, int | float]
    seconds: float

    @property
    def name(self) -> str:
        return self.spec.name

    def to_json(self) -> dict:
        return {"pass": self.name, "modified": self.modified, "stats": dict(self.stats)}


@dataclasses.dataclass
class PipelineReport:
    """The outcome of ``run_pipeline``: one record per pass, in order."""

    pipeline: Pipeline
    records: list[PassRecord]

    @property
    def modified(self) -> bool:
        return any(record.modified for record in self.records)

    def to_json(self) -> list[dict]:
        return [record.to_json() for record in self.records]

    def __str__(self) -> str:
        rows = [("#", "pass", "changed", "time", "stats")]
        for i, record in enumerate(self.records, 1):
            stats = ", ".join(f"{k}={format_value(v)}" for k, v in record.stats.items()) or "-"
            rows.append(
                (str(i), str(record.spec), "yes" if record.modified else "no", f"{record.seconds:.2f}s", stats)
            )
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        lines = [f"pipeline: {self.pipeline}"]
        for row in rows:
            cells = [row[c].ljust(widths[c]) for c in range(4)] + [row[4]]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def run_pipeline(
    model: ir.Model,
    pipeline: Pipeline | str,
    *,
    verify: bool = False,
    after_change: AfterChange | None = None,
    progress: bool = False,
    registry: Registry | None = None,
) -> PipelineReport:
    """Build the pipeline's passes from the registry and run them in place on ``model``."""
    if isinstance(pipeline, str):
        pipeline = Pipeline.parse(pipeline)
    passes = [build_pass(spec, registry) for spec in pipeline]
    return run_passes(
        model, passes, specs=list(pipeline), verify=verify, after_change=after_change, progress=progress
    )


def run_passes(
    model: ir.Model,
    passes: Sequence[PanguPass],
    *,
    specs: Sequence[PassSpec] | None = None,
    verify: bool = False,
    after_change: AfterChange | None = None,
    progress: bool = False,
) -> PipelineReport:
    """Run already-built passes in order, in place; ``specs`` default to each pass's options."""
    if not passes:
        raise PanguLightError("the pipeline is empty; name at least one pass")
    if specs is None:
        specs = [PassSpec(p.name, _user_options(p)) for p in passes]
    if len(specs) != len(passes):
        raise ValueError("run_passes: specs and passes differ in length")
    pipeline = Pipeline(list(specs))
    total = len(passes)
    if verify:
        verify_model(
            model,
            where="in the input model, before any pass ran",
            fix="re-export it with `pangu-light export`, or run without --verify to skip the check",
        )
    records: list[PassRecord] = []
    for index, (pass_, spec) in enumerate(zip(passes, specs)):
        where = f"pass {spec.name} (step {index + 1} of {total}"
        where += f", after {', '.join(s.name for s in specs[:index])})" if index else ", the first)"
        if progress:
            print(f"[{index + 1}/{total}] {spec} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = pass_(model)
        except PanguLightError as error:
            raise PanguLightError(f"{where}: {error}") from error
        except ir.passes.PreconditionError as error:
            cause = error.__cause__ or error
            raise PanguLightError(
                f"{where} cannot run on this model: {' '.join(str(cause).split())}"
            ) from error
        except Exception as error:
            raise ir.passes.PassError(f"{where} failed: {type(error).__name__}: {error}") from error
        seconds = time.perf_counter() - start
        model = result.model
        stats = dict(getattr(pass_, "stats", {}))
        records.append(PassRecord(spec, bool(result.modified), stats, seconds))
        if progress:
            state = "changed the graph" if result.modified else "no change"
            print(f"[{index + 1}/{total}] {spec.name}: {state} ({seconds:.2f}s)", file=sys.stderr, flush=True)
        if result.modified:
            if verify:
                verify_model(model, where=f"after {where}")
            if after_change is not None:
                after_change(index, spec.name, model)
    report = PipelineReport(pipeline, records)
    _record_provenance(model, report)
    return report


def _user_options(pass_: PanguPass) -> dict:
    """Options as a spec would give them: the resolved options that differ from defaults."""
    schema = pass_.schema()
    return {
        key: value
        for key, value in pass_.options.items()
        if schema[key].required or value != schema[key].default
    }


def _record_provenance(model: ir.Model, report: PipelineReport) -> None:
    props = model.metadata_props
    text = str(report.pipeline)
    previous = props.get(contract.PIPELINE)
    props[contract.PIPELINE] = f"{previous},{text}" if previous else text
    entries = pass_records(props) + report.to_json()
    props[contract.PASS_STATS] = json.dumps(entries, separators=(",", ":"))
