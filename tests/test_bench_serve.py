"""`nanoseek bench serve` on a tiny GGUF (the real figures come from SmolLM2 against llama.cpp's server, see
benchmarks/RESULTS.md): the real `nanoseek serve` process is started, driven with concurrent streams and
stopped; the printed table parses, its counts add up, its figures are finite and positive, the plot is
written, and a missing llama.cpp is said plainly. How streams are judged (completed, cut short, timed out)
is checked on hand-made streams with given times."""

from __future__ import annotations

import json
import math
import re

import pytest

from nanoseek.bench import serve as bench
from nanoseek.cli import main
from serve_helpers import tiny_llama_gguf


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf", cell)]


@pytest.mark.timeout(600)  # the benchmark bounds itself too: --startup-timeout, --request-timeout
def test_serve_benchmark_quick(tmp_path, capsys, monkeypatch):
    real_find_spec = bench.importlib.util.find_spec
    # llama.cpp must degrade to a clear note; pretend it is not installed so the test is the same on
    # machines with and without it (and never runs llama.cpp on the tiny byte-level vocabulary)
    # (its server's extras too, so the note is the same whether they are installed or not)
    server_modules = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda name, *a: None if name in server_modules else real_find_spec(name, *a)
    )
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf")
    plot, raw = tmp_path / "serve.png", tmp_path / "serve.json"
    argv = ["bench", "serve", str(gguf), "--quick", "--peers", "llama.cpp", "--threads", "1", "--startup-timeout",
            "300", "--request-timeout", "120", "--plot", str(plot), "--json", str(raw)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out

    assert (
        f"llama.cpp MISSING: {', '.join(server_modules)} not importable" in out and "pip install -e '.[bench]'" in out
    )
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    table = [r for r in rows if len(r) == 10 and r[0] != "server"]
    assert [(r[0], r[1]) for r in table] == [("nanoseek", "1"), ("nanoseek", "2")]
    for _server, c, completed, failed, *figures in table:
        done, sent = map(int, completed.split("/"))
        assert (done, sent) == (int(c), int(c)) and failed == "—", (completed, failed)
        for column, cell in enumerate(figures):
            values = _numbers(cell)
            # times (TTFT, its p90 and p99, TPOT) may print as 0.0 ms: on a busy machine the client can read a
            # tiny model's remaining chunks in one go, so a stream's time per output token is ~0; rates may not
            floor_ok = (lambda v: v >= 0) if column < 4 else (lambda v: v > 0)
            assert len(values) == 3 and all(math.isfinite(v) and floor_ok(v) for v in values), cell
            median, lo, hi = values
            assert lo <= median <= hi

    data = json.loads(raw.read_text())
    max_tokens = data["args"]["max_tokens"]
    assert max_tokens == 8 and data["args"]["rounds"] == 1
    for c, per_round in data["figures"]["nanoseek"].items():
        (f,) = per_round
        assert f["sent"] == int(c) == f["completed"] + sum(f["failures"].values())
        assert f["tokens_streamed"] == f["completed"] * max_tokens  # the server's usage chunks say so
        assert f["prompt_tokens"] and min(f["prompt_tokens"]) > 0
        assert f["ttft_p99_ms"] >= f["ttft_p90_ms"] >= f["ttft_ms"] > 0
    assert re.search(r"prompts: 3 prompts of \d+–\d+ tokens", out)  # C=1 and C=2, tokenized by the server
    assert "every server gave the same output in every round" in out
    # the agreement check before timing asked the server for its greedy pick at every position (no peer here)
    assert "agreement, checked before timing" in out and "no peer to compare with" in out
    assert len(data["checked_before_timing"]["picks"]["nanoseek"]) == data["args"]["agreement_positions"] == 16
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stream(sent=0.0, first=0.1, last=0.8, end=0.9, finish="length", done=True, usage=8, error=None):
    return bench.Stream(sent=sent, first=first, last=last, end=end, chunks=8, usage_tokens=usage,
                        finish_reason=finish, done=done, error=error)  # fmt: skip


def test_streams_are_judged_and_counted():
    completed = _stream()
    cut = _stream(finish=None, usage=None, first=0.05, last=0.05)  # llama.cpp's server cut it off: [DONE], no reason
    timed_out = _stream(done=False, finish=None, error="timeout (60 s)")
    early = _stream(finish="stop", usage=3)
    counted = _stream(sent=0.5, first=0.7, last=1.4, end=1.5, usage=None)  # no usage chunk: "length" means 8
    assert [s.verdict(8) for s in (completed, cut, timed_out, early, counted)] == [
        "completed", "cut short (no finish_reason)", "timeout (60 s)", "stop after 3 tokens", "completed",
    ]  # fmt: skip
    level = bench.Level(concurrency=5, wall=2.0, streams=[completed, cut, timed_out, early, counted])
    f = bench.level_figures(level, 8)
    assert (f["sent"], f["completed"]) == (5, 2)
    assert f["failures"] == {"cut short (no finish_reason)": 1, "timeout (60 s)": 1, "stop after 3 tokens": 1}
    assert f["aggregate_tok_s"] == pytest.approx(2 * 8 / 2.0)  # completed streams' tokens over the wall time
    assert f["ttft_ms"] == pytest.approx(150.0)  # median of 100 and 200 ms
    assert f["ttft_p90_ms"] == pytest.approx(190.0)
    assert f["tpot_ms"] == pytest.approx(800 / 7)  # (end - first) / (tokens - 1), the same for both
    assert f["request_tok_s"] == pytest.approx((8 / 0.9 + 8 / 1.0) / 2)  # median of the two rates


def test_percentile_and_spread():
    assert bench.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert bench.percentile([0.0, 10.0], 0.9) == pytest.approx(9.0)
    assert math.isnan(bench.percentile([], 0.5))
    assert bench.spread([math.nan, math.nan]) == "—"
    assert bench.spread([1.0, math.nan, 3.0]) == "2.0 (1.0–3.0) [2/3 rounds]"


def test_peer_missing_is_a_note(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a: None)
    specs, notes = bench.peer_specs(["llama.cpp", "llama.cpp-queue"], tmp_path / "m.gguf", 2, 2048)
    assert specs == [] and len(notes) == 2 and all("MISSING" in n and "llama_cpp" in n for n in notes)


@pytest.mark.parametrize(
    "args, message",
    [(["--concurrency", "1,x"], "--concurrency takes integers"), (["--concurrency", "0"], ">= 1"),
     (["--peers", "vllm"], "unknown peer 'vllm'"), (["--max-tokens", "0"], "--max-tokens must be >= 1"),
     (["--request-timeout", "0"], "--request-timeout must be > 0")],
)  # fmt: skip
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    assert main(["bench", "serve", "nosuch.gguf", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_llama_server_command_line(tmp_path):
    """The peers are llama.cpp's own server as a user would start it; -queue only turns off interruption."""
    specs, notes = bench.peer_specs(["llama.cpp", "llama.cpp-queue"], tmp_path / "m.gguf", 2, 2048)
    if notes:
        pytest.skip(notes[0])
    spec, queue = specs
    argv = spec.argv(8123)
    assert argv[1:3] == ["-m", "llama_cpp.server"] and argv[argv.index("--n_threads") + 1] == "2"
    assert argv[argv.index("--interrupt_requests") + 1] == "True"
    queue_argv = queue.argv(8123)
    assert queue_argv[queue_argv.index("--interrupt_requests") + 1] == "False"
    assert spec.equal_work(64) == {"min_tokens": 64}


def test_prompts_differ_across_levels_and_warmup():
    prompts = bench.level_prompts([1, 4, 16], 40)
    assert [len(prompts[k]) for k in ("warmup", 1, 4, 16)] == [1, 1, 4, 16]
    every = [p for ps in prompts.values() for p in ps]
    assert len(set(every)) == len(every) == 22 and all(len(p.split()) == 40 for p in every)
    with pytest.raises(ValueError, match="distinct prompts"):
        bench.make_prompts(10_000, 40)


def test_prompt_tokens_compared_across_servers():
    same = {"nanoseek": [[1, 2], [3, 4, 5]], "llama.cpp": [[1, 2], [3, 4, 5]]}
    assert bench.same_prompt_tokens(same).endswith("2 prompts of 2–3 tokens (each server's tokenize endpoint): "
                                                   "the same token ids on every server")  # fmt: skip
    differ = {"nanoseek": [[1, 2], [3, 4, 5]], "llama.cpp": [[0, 1, 2], [3, 4, 5]]}
    assert bench.same_prompt_tokens(differ).endswith("DIFFERENT token ids on llama.cpp for 1")


def test_nanoseek_server_runs_with_its_defaults_or_compiled():
    from pathlib import Path

    from nanoseek.bench.serve import nanoseek_spec

    plain = nanoseek_spec(Path("m.gguf"), "auto", 16).argv(8000)
    assert plain[-6:] == ["--quant", "auto", "--max-num-seqs", "16", "--shutdown-timeout", "2"]
    assert nanoseek_spec(Path("m.gguf"), "auto", 16, compile=True).argv(8000) == [*plain, "--compile"]
