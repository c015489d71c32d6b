"""Imports point one way: `weights/`, `train/` and `engine/` may import `model/`; `model/` imports none of
them (checkpoint formats, training and serving are applied to a model from outside)."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL_DIR = Path(__file__).parents[1] / "src" / "nanoseek" / "model"
FORBIDDEN = ("nanoseek.weights", "nanoseek.train", "nanoseek.engine")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, nested (lazy) ones included."""
    package = "nanoseek.model"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against nanoseek.model
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from nanoseek import x`
    return sorted(found)


def forbidden_imports(path: Path) -> list[str]:
    return [
        f"{path.name}:{line} imports {name}"
        for line, name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    ]


def test_model_package_never_imports_weights_train_or_engine():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert len(files) >= 5, f"no model sources found under {MODEL_DIR}"
    offences = [o for f in files for o in forbidden_imports(f)]
    assert not offences, "model/ must not depend on weights/, train/ or engine/:\n" + "\n".join(offences)


def test_the_check_sees_lazy_relative_and_from_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\n"
        "def f():\n    from nanoseek.weights.safetensors_io import WeightsError\n"
        "from ..train import data\n"
        "from nanoseek import engine\n"
        "import nanoseek.model.norm\n"
    )
    assert forbidden_imports(bad) == [
        "bad.py:3 imports nanoseek.weights.safetensors_io",
        "bad.py:3 imports nanoseek.weights.safetensors_io.WeightsError",
        "bad.py:4 imports nanoseek.train",
        "bad.py:4 imports nanoseek.train.data",
        "bad.py:5 imports nanoseek.engine",
    ]
