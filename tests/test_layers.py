"""The package's shape: tiers that import one way, no cycles, a torch-free planner, modules of readable size.

Imports run cli -> run -> plan -> probe -> constraints -> levers -> platform -> config -> (units,
errors, paths, ...). A module-level import against that direction, or any cycle, fails here; so does
a module over 500 lines.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parent.parent / "advisor"
# Lower number = lower layer; a module may import its own layer or lower ones at module level.
LAYERS = {
    "errors": 0,
    "units": 0,
    "paths": 0,
    "files": 0,
    "packages": 0,
    "terminal": 0,
    "config": 1,
    "schema": 1,
    "migrations": 1,
    "platform": 2,
    "levers": 3,  # one module per technique: below everyone who plans, checks or applies with them
    "constraints": 4,
    "probe": 5,
    "plan": 6,
    "run": 7,
    "trace": 7,
    "rehearse": 7,
    "testing": 7,
    "render": 8,
    "arguments": 8,
    "cli": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def top_level_imports(path: Path) -> set[str]:
    """advisor modules imported when `path` is imported (not inside functions, not under TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for item in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else ():
            if (
                isinstance(item, ast.ImportFrom)
                and item.module
                and item.module.startswith("advisor")
                and item.level == 0
            ):
                found.add(item.module)
            elif isinstance(item, ast.Import):
                found.update(alias.name for alias in item.names if alias.name.startswith("advisor"))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in top_level_imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_every_import_points_down_the_layers():
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if layer(name) is not None and layer(target) is not None and layer(target) > layer(name)
    ]
    assert upward == []


def test_no_import_cycle_inside_the_package():
    # Function-level imports count too: the graph of every `from advisor... import` anywhere.
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for item in ast.walk(ast.parse(path.read_text())):
            if isinstance(item, ast.ImportFrom) and item.module in MODULES and item.level == 0:
                targets.add(item.module)
        graph[name] = targets - {name} - {"advisor"}
    # The root package re-exports names lazily; it is the public surface, not a layer.
    graph.pop("advisor", None)

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [cycle_from(name) for name in graph]
    assert [c for c in cycles if c] == []


def test_modules_stay_readable():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


@pytest.mark.parametrize(
    "module", ["advisor.plan.recommend", "advisor.plan.space", "advisor.probe.hardware", "advisor.constraints"]
)
def test_the_probe_and_plan_tiers_import_no_torch(module):
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'optuna', 'transformers') if m in sys.modules)))"
    heavy = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert heavy == []
