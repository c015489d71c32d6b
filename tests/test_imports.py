"""Imports point one way. src/nanoseek's packages (and top-level modules) sit in layers, lowest first; a file
may import only from layers below its own (its own package aside), lazy imports included:

    0  assets, memory, meter,      helpers (a run's throughput, MFU, energy and cost: meter); synthetic tasks,
       tasks                       prompt formats, rule rewards, statistics (import no other unit)
    1  model, native               the model code; building and loading the C++ kernels (native/csrc)
    2  quant, parallel             applied to a built model from outside: packed weights, DDP/FSDP2
    3  weights, engine             checkpoint formats (packing while loading: quant); the inference engine
    4  tokenizer, loading          tokenizer.json / GGUF vocabularies; `nanoseek.load`
    5  nanoseek                    the facade (`import nanoseek`: load, load_tokenizer, ...)
    6  eval, serve                 evaluation (tasks + engine); the HTTP server (engine + tokenizer)
    7  train                       pretraining, SFT, GRPO, distillation (evaluates through eval)
    8  bench                       benchmarks (may run training)
    9  commands                    the command line's subcommands
    10 cli                         the command line (`python -m nanoseek`: 11 __main__)

So `model/` imports none of the packages that use it (checkpoint formats, quantization, training and serving are
applied to a model from outside); `train/` and `eval/` share `tasks/`, and `eval/` never imports `train/`; `weights/`
packs with `quant/` and `engine/` runs what it packed, and neither imports the other. Units in one layer do not
import each other. `MUST_NOT_IMPORT` is the table this order gives (unit -> the units it must not import), and
every package and top-level module must have a layer, so a new one is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "nanoseek"
MODEL_DIR = SRC / "model"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("assets", "memory", "meter", "tasks"),
    ("model", "native"),
    ("quant", "parallel"),
    ("weights", "engine"),
    ("tokenizer", "loading"),
    ("nanoseek",),  # the package's __init__: its public names
    ("eval", "serve"),
    ("train",),
    ("bench",),
    ("commands",),
    ("cli",),  # dispatches to commands/ by name (importlib)
    ("__main__",),
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
# unit -> the units it must not import: those in its own layer and above (the table the test enforces)
MUST_NOT_IMPORT = {unit: {u for u in LAYER if LAYER[u] >= LAYER[unit] and u != unit} for unit in LAYER}
FORBIDDEN = tuple(f"nanoseek.{u}" for u in sorted(MUST_NOT_IMPORT["model"]) if u != "nanoseek")


def imported_modules(path: Path, package: str = "nanoseek.model") -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, nested (lazy) ones included; relative imports
    resolve against `package`, the package the file is in."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module != "nanoseek":  # `from nanoseek import native` imports nanoseek.native, not the facade
                found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from nanoseek import x`
    return sorted(found)


def forbidden_imports(path: Path, forbidden: tuple[str, ...] = FORBIDDEN, package: str = "nanoseek.model") -> list[str]:
    return [
        f"{path.name}:{line} imports {name}"
        for line, name in imported_modules(path, package)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def unit_of(module: str) -> str | None:
    """The layered unit an absolute module name belongs to: `nanoseek.train.data` -> train; `nanoseek` and names
    of the facade (`nanoseek.load`, `nanoseek.__version__`) -> nanoseek; None outside nanoseek."""
    parts = module.split(".")
    if parts[0] != "nanoseek":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else "nanoseek"


def sources() -> list[tuple[Path, str, str]]:
    """(file, its unit, its package) of every Python file under src/nanoseek."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("").parts
        unit = rel[0] if len(rel) > 1 else ("nanoseek" if rel[0] == "__init__" else rel[0])
        package = ".".join(("nanoseek", *rel[:-1]))  # for relative imports (__init__.py: its own package)
        found.append((path, unit, package))
    return found


def layering_offences(path: Path, unit: str, package: str, root: Path = SRC) -> list[str]:
    offences = []
    for line, name in imported_modules(path, package):
        target = unit_of(name)
        if target in MUST_NOT_IMPORT[unit]:
            where = f"{unit} is in layer {LAYER[unit]}, {target} in layer {LAYER[target]}"
            offences.append(f"{path.relative_to(root)}:{line} imports {name} ({where})")
    return offences


def test_model_package_never_imports_weights_train_or_engine():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert len(files) >= 5, f"no model sources found under {MODEL_DIR}"
    assert {"nanoseek.weights", "nanoseek.train", "nanoseek.engine", "nanoseek.quant"} <= set(FORBIDDEN)
    offences = [o for f in files for o in forbidden_imports(f)]
    assert not offences, "model/ must not depend on weights/, train/ or engine/:\n" + "\n".join(offences)


def test_every_package_and_module_has_a_layer():
    units = {unit for _, unit, _ in sources()}
    assert units == set(LAYER), f"not layered: {sorted(units - set(LAYER))}; gone: {sorted(set(LAYER) - units)}"


def test_imports_point_down_the_layers():
    files = sources()
    assert len(files) >= 100, f"only {len(files)} sources found under {SRC}"
    offences = [o for path, unit, package in files for o in layering_offences(path, unit, package)]
    assert not offences, "imports against the layer order (see this file's docstring):\n" + "\n".join(offences)


def test_the_table_holds_the_orders_the_moves_were_for():
    """The back-edges there were: eval <-> train (tasks, prompt ids, statistics), weights -> engine (quant)."""
    assert {"train", "eval", "engine", "serve", "weights", "model"} <= MUST_NOT_IMPORT["tasks"]
    assert "train" in MUST_NOT_IMPORT["eval"] and "eval" not in MUST_NOT_IMPORT["train"]
    assert {"weights", "engine", "train", "eval", "serve"} <= MUST_NOT_IMPORT["quant"]
    assert {"engine", "train", "eval", "serve"} <= MUST_NOT_IMPORT["weights"]
    assert {"weights", "train", "eval", "serve"} <= MUST_NOT_IMPORT["engine"]
    assert {"weights", "quant", "native", "engine", "train", "eval", "serve"} <= MUST_NOT_IMPORT["model"]


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


def test_the_layer_check_knows_the_facade_and_relative_imports(tmp_path):
    (tmp_path / "engine").mkdir()
    bad = tmp_path / "engine" / "bad.py"
    bad.write_text(
        "from nanoseek import native\n"  # layer 1: fine from engine
        "from nanoseek.quant import quantize_model\n"  # layer 2: fine
        "def f():\n    import nanoseek\n"  # the facade (layer 5): not from engine
        "from nanoseek import load\n"  # a facade name
        "from .. import weights\n"  # a sibling in its own layer
        "from ..tasks.stats import pass_at_k\n"  # layer 0: fine
        "from . import kv_cache\n"  # its own package
    )
    assert layering_offences(bad, "engine", "nanoseek.engine", root=tmp_path) == [
        "engine/bad.py:4 imports nanoseek (engine is in layer 3, nanoseek in layer 5)",
        "engine/bad.py:5 imports nanoseek.load (engine is in layer 3, nanoseek in layer 5)",
        "engine/bad.py:6 imports nanoseek.weights (engine is in layer 3, weights in layer 3)",
    ]


# Loading a model and generating with it, eagerly, in a fresh interpreter: which heavy modules come along
_LOAD_AND_GENERATE = """
import sys
import torch
import nanoseek
from nanoseek.model.config import from_name
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
