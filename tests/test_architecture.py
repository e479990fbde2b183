"""The floor plan (docs/architecture.md): each package imports only from its own floor and the
floors below it, at the top of a module or inside a function alike; no cycles."""

import ast

from tests.helpers import REPO

FLOORS = ["errors", "ui", "files", "device", "data", "model", "features", "methods", "training",
          "evaluation", "classify", "analysis", "cli"]
CORE = {"errors": 0, "ui": 0, "files": 0, "device": 0}


def _floor(module: str) -> int | None:
    """The floor of ssl_blood.<first>...; None for the package itself and __main__."""
    parts = module.split(".")
    if parts[0] != "ssl_blood" or len(parts) == 1 or parts[1] in ("__main__",):
        return None
    first = parts[1]
    return CORE.get(first, FLOORS.index(first) if first in FLOORS else None)


def test_no_module_imports_from_a_floor_above_its_own():
    upward = []
    for path in sorted((REPO / "ssl_blood").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        own = _floor(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if isinstance(node, ast.ImportFrom) and node.module == "ssl_blood":
                names = [f"ssl_blood.{a.name}" for a in node.names]
            for name in names:
                target = _floor(name)
                if target is not None and target > own:
                    upward.append(f"{module} -> {name}")
    assert upward == []
