"""rayq.kernels imports torch and the standard library only (DESIGN: kernels <- rayq <- eval ...)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import rayq.kernels

ALLOWED_THIRD_PARTY = {"torch", "torch_xla"}  # torch_xla only inside the XLA branch, when present


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_kernels_import_torch_only():
    files = sorted(Path(rayq.kernels.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for f in files:
        # torchao is measured in the bench when importable, inside a function: not a dependency
        extra = _top_level_imports(f) - set(sys.stdlib_module_names) - ALLOWED_THIRD_PARTY - {"__future__", "torchao"}
        assert not extra, (f.name, extra)
