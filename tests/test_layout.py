"""The layout's rules, read from the source: imports run one way (jobs -> pipelines -> models, and down
pipelines' layers), no stage imports another, and no import circle in jobs/."""

from __future__ import annotations

import ast
import pathlib

import pytest

from jobs.stages import STAGES

REPO = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("core", "data", "train", "evaluate", "report")  # pipelines/__init__.py: each imports those before it


def imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports too)."""
    out: set[str] = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def sources(folder: str) -> list[pathlib.Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_every_library_module_lives_in_a_layer():
    assert sorted(p.name for p in (REPO / "pipelines").glob("*.py")) == ["__init__.py"]
    assert sorted(p.name for p in (REPO / "pipelines").iterdir() if (p / "__init__.py").exists()) == sorted(LAYERS)


def test_the_report_reads_the_stages_of_the_stage_table():
    from jobs.stages import NAMES
    from pipelines.report.collect import STAGE_NAMES

    assert STAGE_NAMES == NAMES


def test_models_import_neither_pipelines_nor_jobs():
    bad = [(p.name, m) for p in sources("models") for m in imports(p) if m.split(".")[0] in ("pipelines", "jobs")]
    assert bad == []


@pytest.mark.parametrize("layer", LAYERS)
def test_each_pipelines_layer_imports_only_the_layers_before_it(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    bad = []
    for p in sources(f"pipelines/{layer}"):
        for m in imports(p):
            parts = m.split(".")
            if parts[0] == "jobs" or (parts[0] == "pipelines" and len(parts) > 1 and parts[1] in LAYERS
                                      and parts[1] not in allowed):
                bad.append((str(p.relative_to(REPO)), m))
    assert bad == []


def test_no_stage_imports_another_stage():
    stage_modules = {s.module for s in STAGES}
    bad = [(s.module, m) for s in STAGES for m in imports(REPO / (s.module.replace(".", "/") + ".py"))
           if m in stage_modules - {s.module} or m in {f"jobs.{n}" for n in ("run", "demo", "cli")}]
    assert bad == []


def test_jobs_has_no_import_circle():
    graph = {f"jobs.{p.stem}": {m for m in imports(p) if m.startswith("jobs.") and m.count(".") == 1}
             for p in sources("jobs") if p.stem != "__init__"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m, {m})] == []


def test_an_unmarked_test_that_starts_a_process_fails_naming_the_marker():
    """The fast tier's guard (tests/conftest.py): this test is not marked `ray`, so it may start no interpreter."""
    import subprocess
    import sys

    with pytest.raises(RuntimeError, match="starts a process .*: mark it @pytest.mark.ray"):
        subprocess.run([sys.executable, "-c", "pass"])
