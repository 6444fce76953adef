"""The import rules between our packages, checked on the source (no imports are executed).

    core        the standard library only
    runtime     of ours, only core                 (it ships alone: sessions, generation, bench)
    reports     of ours, only core                 (tables, cost model, charts)
    passes      of ours, only core; never torch or onnxruntime (a pass is a pure graph rewrite)
    calib       never tools or frontend
    deploy      never tools or frontend          (building deployment graphs: ORT's quantizer)
    search      never tools or frontend          (the shape search: candidates, latency, proxy)
    frontend    never tools
    tools       a command module (*_cmd.py) never imports another command module
    benchmarks  never a command module

A violation names the file, the line and the rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "runtime", "reports", "passes", "calib", "deploy", "search", "frontend", "tools")


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, at any depth (function-level
    imports count), relative imports resolved against ``module``'s package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if _is_command(alias.name)]
    return found


def _is_command(name: str) -> bool:
    return name.rsplit(".", 1)[-1].endswith("_cmd")


def _ours(name: str) -> str | None:
    """The package of ours that ``name`` belongs to ("passes", ...), or None for third-party."""
    parts = name.split(".")
    return parts[1] if parts[0] == "pangu_light" and len(parts) > 1 else None


def violations(package: str, module: str, source: str) -> list[str]:
    """The rules ``source`` (the module ``pangu_light.<package>...`` or a benchmark) breaks."""
    problems = []
    for line, name in imported_modules(source, module):
        top, ours = name.split(".")[0], _ours(name)
        rule = None
        if package == "core" and top not in sys.stdlib_module_names and top != "__future__" and ours != "core":
            rule = "core imports only the standard library"
        elif package in ("runtime", "reports") and ours not in (None, "core", package):
            rule = f"{package} imports nothing of ours but core"
        elif package == "passes" and (top in ("torch", "onnxruntime") or ours not in (None, "core", "passes")):
            rule = "passes import neither torch, onnxruntime nor any package of ours but core"
        elif package in ("calib", "deploy", "search") and ours in ("tools", "frontend"):
            rule = f"{package} never imports tools or frontend"
        elif package == "frontend" and ours == "tools":
            rule = "frontend never imports tools"
        elif package == "tools" and _is_command(module) and _is_command(name) and name != module:
            rule = "a command module never imports another command module"
        elif package == "benchmarks" and _is_command(name):
            rule = "benchmarks import no command module"
        if rule:
            problems.append(f"{module}:{line} imports {name}: {rule}")
    return problems


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT / package).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            yield package, ".".join(["pangu_light", package, *parts]), path
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        yield "benchmarks", f"benchmarks.{path.stem}", path


def test_every_module_keeps_the_import_rules():
    problems = [p for package, module, path in _sources() for p in violations(package, module, path.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "package, module, source",
    [
        ("core", "pangu_light.core.files", "import numpy"),
        ("runtime", "pangu_light.runtime.session", "from pangu_light.passes.infra import plan"),
        ("reports", "pangu_light.reports.table", "from pangu_light.calib import stats"),
        ("passes", "pangu_light.passes.rewrites.slnp", "def f():\n    import torch"),
        ("passes", "pangu_light.passes.rewrites.slnp", "import onnxruntime as ort"),
        ("passes", "pangu_light.passes.analysis.model_map", "from pangu_light.calib.stats import CalibrationStats"),
        ("calib", "pangu_light.calib.stats", "from pangu_light.frontend import loading"),
        ("calib", "pangu_light.calib.stats", "from ..tools import arguments"),
        ("search", "pangu_light.search.driver", "from pangu_light.frontend import export"),
        ("frontend", "pangu_light.frontend.export", "import pangu_light.tools.cli"),
        ("tools", "pangu_light.tools.prune_cmd", "from pangu_light.tools import plan_cmd"),
        ("tools", "pangu_light.tools.prune_cmd", "from pangu_light.tools.eval_cmd import run"),
        ("benchmarks", "benchmarks.clap_quality", "from pangu_light.tools.calibrate_cmd import run"),
    ],
)
def test_a_forbidden_import_is_reported(package, module, source):
    assert violations(package, module, source), f"{source!r} in {module} should break a rule"


@pytest.mark.parametrize(
    "package, module, source",
    [
        ("core", "pangu_light.core.records", "import json\nfrom pangu_light.core import contract"),
        ("runtime", "pangu_light.runtime.generate", "import numpy\nfrom pangu_light.core import contract"),
        ("passes", "pangu_light.passes.rewrites.slnp", "import onnx_ir\nfrom ..analysis import parameters"),
        ("calib", "pangu_light.calib.stats", "from pangu_light.runtime.session import create_session"),
        ("tools", "pangu_light.tools.prune_cmd", "from pangu_light.tools.arguments import add_text_arguments"),
        ("benchmarks", "benchmarks.clap_quality", "from pangu_light.calib.stats import calibrate"),
    ],
)
def test_an_allowed_import_passes(package, module, source):
    assert violations(package, module, source) == []
