"""`nanoseek bench decode` end to end on a tiny Q4_1 GGUF (the real figures come from SmolLM2, see
benchmarks/RESULTS.md): every side runs in its own process, the printed figures are finite and positive,
the plot is written, greedy nanoseek fp32 equals transformers, and a missing llama.cpp is said plainly."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from gguf_writer import VOCAB_SIZE, write_gguf
from nanoseek.bench import decode
from nanoseek.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, num_hidden_layers=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name else 0.0))
    return write_gguf(tmp_path_factory.mktemp("decode") / "tiny-Q4_1.gguf", model, "llama", qtype="Q4_1")


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf", cell)]


def test_decode_benchmark_smoke(tiny_gguf, tmp_path, capsys, monkeypatch):
    real_find_spec = decode.importlib.util.find_spec
    # llama.cpp's column must degrade to a clear note; pretend it is not installed so the test is the same
    # on machines with and without it
    monkeypatch.setattr(
        decode.importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    # and llama-bench's too: its build folder (for this CPU) is an empty one here
    from nanoseek.bench import peers

    empty = peers.Build(tmp_path / "peers" / "llama.cpp-x-native-0", {"GGML_NATIVE": "ON"}, frozenset())
    monkeypatch.setattr(peers.Build, "for_this_cpu", classmethod(lambda cls, root=None: empty))
    plot, raw = tmp_path / "decode.png", tmp_path / "decode.json"
    argv = ["bench", "decode", str(tiny_gguf), "--threads", "1", "--reps", "2", "--prompt-tokens", "20",
            "--decode-tokens", "33", "--concurrency", "1,3", "--batch-prompt-tokens", "8", "--batch-tokens", "4",
            "--formats", "fp32,int8", "--deepseek", "test-tiny", "--plot", str(plot), "--json", str(raw)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out

    assert "llama.cpp column MISSING" in out and "pip install -e '.[bench]'" in out
    assert "llama-bench column MISSING: llama.cpp's llama-bench is not built" in out and "make peers" in out
    figures_text, targets_text = out.split("targets, every nanoseek format")

    def table(text: str) -> list[list[str]]:
        return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]

    rows = table(figures_text)
    speed = {r[0]: r[1:] for r in rows if len(r) == 6 and r[0] != "side"}  # decode, prefill, TTFT, agg@1, agg@3
    memory = {r[0]: r[1:] for r in rows if len(r) == 11 and r[0] != "side"}
    assert set(speed) == set(memory) == {"transformers", "nanoseek-fp32", "nanoseek-int8"}
    for label, cells in speed.items():
        for cell in cells:
            median, low, high = _numbers(cell)
            assert all(math.isfinite(x) and x > 0 for x in (median, low, high)), (label, cell)
            assert low <= median <= high
    for label, cells in memory.items():
        weights_mb, imports_mb, loaded_mb, warmup_mb, peak_mb = (_numbers(cells[i])[0] for i in (0, 2, 4, 5, 6))
        assert weights_mb >= 0 and imports_mb > 0 and loaded_mb > 0 and warmup_mb > 0, (label, cells)
        assert _numbers(cells[7])[0] <= peak_mb, (label, cells)  # idle after <= the peak since the warm-up
    int8 = memory["nanoseek-int8"]
    assert _numbers(int8[1])[0] >= 0  # the KV cache it allocated, in MB (0.0 at this size)
    whole, above = _numbers(int8[8])[0], _numbers(int8[9])[0]  # the peak over weights + KV, with and without imports
    assert math.isfinite(whole) and 0 < above < whole
    # the targets: every format, each target's value with its verdict, or "not measured" (no llama.cpp here,
    # no 16-stream task)
    targets = {r[0].split(" (")[0]: r[1:] for r in table(targets_text) if r[0] != "format" and len(r) == 7}
    assert set(targets) == {"fp32", "int8"}
    for label, (vs_bench, vs_llama, agg16, vs_hf, above_libs, whole) in targets.items():
        assert vs_bench == vs_llama == agg16 == "not measured", label
        for cell in (vs_hf, above_libs, whole):
            assert re.fullmatch(r"\d+\.\d\dx (met|MISSED by \d+\.\d\dx)", cell), (label, cell)
    assert _numbers(targets["int8"][4])[0] == _numbers(int8[9])[0]  # the same ratio as the memory table's
    # the bytes a decode step reads (weights but the embedding table, + KV at the prompt's depth), the bandwidth
    # its speed implies and the ceiling the machine's measured read bandwidth puts on it
    bandwidth = float(re.search(r"read bandwidth: (\d+\.\d) GB/s at 1 threads", out).group(1))
    read = {r[0]: r[1:] for r in table(targets_text) if len(r) == 6 and r[0] != "side"}
    assert set(read) == {"nanoseek-fp32", "nanoseek-int8"}
    for label, (mb, tok_s, gbs, share, ceiling) in read.items():
        weights_mb, kv_mb, per_token_mb = _numbers(mb)
        assert weights_mb > 0 and kv_mb > 0 and per_token_mb == pytest.approx(weights_mb + kv_mb, abs=0.015)
        assert _numbers(tok_s)[0] == _numbers(speed[label][0])[0]  # the decode median of the speed table
        assert _numbers(gbs)[0] == pytest.approx(per_token_mb * _numbers(tok_s)[0] / 1e3, rel=0.05, abs=0.01)
        assert _numbers(share)[0] == pytest.approx(100 * _numbers(gbs)[0] / bandwidth, rel=0.1, abs=1)
        assert _numbers(ceiling)[0] == pytest.approx(bandwidth * 1e3 / per_token_mb, rel=0.05, abs=1)
    assert _numbers(read["nanoseek-int8"][0])[0] < _numbers(read["nanoseek-fp32"][0])[0]  # int8 reads less
    assert re.search(r"NOTE: outputs agree: nanoseek fp32 equals transformers greedy for (\d+) tokens", out)
    assert "agreement with llama.cpp: not checked (no llama.cpp peer runs here)" in out
    # checked before the timing: the notes (printed above the tables) carry it
    assert out.index("outputs agree") < out.index("| side |")
    assert re.search(r"nanoseek-fp32\s+/ transformers\s*: decode \d+\.\d+x", out)
    assert re.search(r"plain: decode \d+\.\d+ \(", out)  # the DeepSeek-V3 run
    assert re.search(r"with MTP speculation: decode \d+\.\d+ .*; MTP drafts accepted \d+ of [1-9]\d* \(\d+%\); "
                     r"the same greedy tokens as plain \(checked before timing\)", out)  # fmt: skip
    assert plot.stat().st_size > 10_000
    figures = json.loads(raw.read_text())["figures"]
    assert all(len(t) == 33 for t in figures["nanoseek-int8"]["tokens"])


def test_decode_benchmark_bad_input(tmp_path, capsys):
    assert main(["bench", "decode", str(tmp_path / "missing.gguf")]) == 2
    assert "no such .gguf file" in capsys.readouterr().err
    assert main(["bench", "decode", "smollm2", "--formats", "int3"]) == 2
    assert "unknown nanoseek format 'int3'" in capsys.readouterr().err
    assert main(["bench", "decode", "smollm2", "--concurrency", "4,x"]) == 2
    assert "--concurrency takes integers" in capsys.readouterr().err
    assert main(["bench", "decode", "smollm2", "--deepseek", str(tmp_path / "no-such-model")]) == 2
    assert "neither a model folder nor a named config" in capsys.readouterr().err
    assert main(["bench", "decode", "smollm2", "--deepseek-prompt", "1+2="]) == 2
    assert "--deepseek-prompt needs a --deepseek model folder" in capsys.readouterr().err


def test_decode_benchmark_runs_a_deepseek_model_folder(tmp_path, capsys):
    """`--deepseek FOLDER` (e.g. the speedrun's final model) loads the folder, MTP layer included, and runs it with
    and without MTP speculation; without a tokenizer in the folder the prompt is random ids of its vocabulary."""
    from types import SimpleNamespace

    from nanoseek.model.config import from_name
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
    from nanoseek.weights.hf_folder import save_pretrained

    torch.manual_seed(0)
    save_pretrained(DeepseekV3ForCausalLM(from_name("test-tiny", num_nextn_predict_layers=1)), tmp_path)
    prompt = decode.deepseek_prompt(str(tmp_path))
    assert len(prompt) == 32 and max(prompt) < from_name("test-tiny").vocab_size
    args = SimpleNamespace(deepseek=str(tmp_path), deepseek_prompt=None, threads=1, reps=1, decode_tokens=12)
    results = decode.run_deepseek(args, decode.worker_env(1))
    plain, mtp = results["plain"], results["with MTP speculation"]
    assert plain["drafted"] == 0 and mtp["drafted"] > 0 and 0 <= mtp["accepted"] <= mtp["drafted"]
    assert plain["tokens"] == mtp["tokens"] and len(plain["tokens"]) == 12
    decode.print_deepseek(args, results)
    out = capsys.readouterr().out
    assert "weights of the folder" in out and "the same greedy tokens as plain" in out


def test_gguf_read_bytes_counts_the_tied_head_and_an_f16_cache(tiny_gguf):
    import gguf

    reader = gguf.GGUFReader(str(tiny_gguf))
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: the table is read whole, as the head
    read = decode.gguf_read_bytes(tiny_gguf, depth=20)
    assert read["weights"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert read["kv"] == 2 * 2 * (16 + 16) * 2 * 20  # layers x kv heads x (K + V dims) x f16 x depth
