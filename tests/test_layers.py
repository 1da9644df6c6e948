"""Architecture guards: imports point down the layers (server -> engine -> storage -> kernels), and the server
reaches the engine only through AsyncEngine's own API. Source reading only: no model, no server."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "strata"
LAYERS = ["server", "engine", "storage", "kernels"]  # each may import only those after it
# Reaching through AsyncEngine: its wrapped LLMEngine (`.engine.engine`, `._engine`) or the engine thread's `_call`.
REACH_IN = re.compile(r"\.engine\.engine\b|\._engine\b|\._call\(")


def _sources(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down_the_layers(layer):
    above = LAYERS[:LAYERS.index(layer)]
    wrong = {f"{p.relative_to(PACKAGE)}: {m}" for p in _sources(layer) for m in _imported_modules(p)
             if any(m == f"strata.{a}" or m.startswith(f"strata.{a}.") for a in above)}
    assert not wrong, f"strata/{layer} imports a layer above it: {sorted(wrong)}"


def test_the_server_reaches_the_engine_only_through_async_engine():
    sources = _sources("server")
    assert sources
    wrong = [f"{p.relative_to(PACKAGE)}: imports {m}" for p in sources for m in _imported_modules(p)
             if m == "strata.engine.llm_engine"]
    for p in sources:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if REACH_IN.search(line) or "LLMEngine" in line:
                wrong.append(f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not wrong, "the server reaches past AsyncEngine:\n" + "\n".join(wrong)
