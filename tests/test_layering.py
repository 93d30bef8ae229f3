"""Dependencies point one way (DESIGN.md): a server that only aggregates, and the algorithms that
describe rounds as messages, load no model code."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

MODEL_CODE = ("transformers", "peft", "datasets", "colora.adapters", "colora.models", "colora.train")


@pytest.mark.parametrize("module", ["colora.aggregation", "colora.algorithms", "colora.codecs", "colora.states",
                                    "colora.messages", "colora.algorithms.server", "colora.deploy.remote"])
def test_importing_leaves_model_code_unloaded(module):
    code = f"import sys, {module}; print(','.join(m for m in {MODEL_CODE!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing {module} loads {loaded}"


def _imports(module: str) -> set[str]:
    """Every module ``module``'s source imports, at any depth of its code, as absolute names."""
    spec = importlib.util.find_spec(module)
    package = module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_data_metrics_do_not_import_the_containers():
    # types.py scores a Task with metrics.py; metrics.py must not import types.py back (it used to,
    # for DataError, which forced a function-level import in types.py).
    assert "colora.data.types" not in _imports("colora.data.metrics")
    assert "colora.data.metrics" in _imports("colora.data.types")


def test_the_per_message_client_app_imports_no_torch():
    # Flower starts a ClientApp process for every message: it must stay a light forwarder.
    code = "import sys, colora.deploy.flower_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
