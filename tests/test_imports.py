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


# Loading a model and generating with it, eagerly, in a fresh interpreter: which heavy modules come along
_LOAD_AND_GENERATE = """
import sys
import torch
import nanoseek
from nanoseek.config import from_name
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.dense import DenseConfig, DenseForCausalLM
from nanoseek.weights.hf_folder import save_pretrained

folder = sys.argv[1]
dense = DenseConfig("llama", num_hidden_layers=2, vocab_size=256, hidden_size=64, intermediate_size=96,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=96)
save_pretrained(DenseForCausalLM(dense), folder + "/llama")
save_pretrained(DeepseekV3ForCausalLM(from_name("test-tiny")), folder + "/deepseek")
assert "torch._dynamo" not in sys.modules, "building and saving imported it"
for name in ("llama", "deepseek"):
    for quant in (None, "int8"):
        model = nanoseek.load(folder + "/" + name, quant=quant)
        engine = Engine(model, EngineConfig(num_blocks=32), eos_ids=[])
        assert len(engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))[0].token_ids) == 4
        assert "torch._dynamo" not in sys.modules, f"{name} {quant} imported it"
print("ok")
"""


def test_loading_and_eager_generation_leave_torch_compile_unimported(tmp_path):
    """torch._dynamo (what torch.compile needs) costs ~70 MB of RSS and ~1.7 s to import: a process that never
    compiles must not pay it (it came in through nn.Embedding's init on the meta device, torch.cat of meta
    tensors and a `torch.compiler.disable` decorator)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_GENERATE, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
