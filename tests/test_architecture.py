"""Layering rules of DESIGN.md, checked on the source: imports point down, models name no mesh axis."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import only the packages listed for it (besides itself and third parties).
# sharding may read pallas_kernels (the memory model takes the fused loss's chunking from the
# kernel itself, so the two cannot drift); pallas_kernels imports no other package, so no cycle.
ALLOWED = {
    "llmjax": {"sharding", "pallas_kernels"},
    "sharding": {"pallas_kernels"},
    "pallas_kernels": set(),
    "experiments": {"llmjax", "sharding", "pallas_kernels"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    bad = {}
    for path in (ROOT / package).rglob("*.py"):
        if path.name.startswith("test_"):
            continue
        wrong = imported_packages(path) - ALLOWED[package] - {package}
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"upward imports: {bad}"


def test_model_code_names_no_mesh_axis():
    from sharding.axes import MESH_AXES

    hits = []
    for path in (ROOT / "llmjax" / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in MESH_AXES:
                hits.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not hits
