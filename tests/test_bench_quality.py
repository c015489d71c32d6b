"""`nanoseek bench quality` (bench/quality.py): the KL / top-1 arithmetic, llama.cpp's --kl-divergence-base file
read back (written here the way tools/perplexity/perplexity.cpp's log_softmax writes it), llama-perplexity's
chunking, the table and the verdict; and, marked slow, a real one-chunk run on SmolLM2 Q4_1 against
llama-perplexity where `make peers` built it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nanoseek.bench import quality


def llama_cpp_row(logits: np.ndarray) -> np.ndarray:
    """One row as perplexity.cpp's log_softmax(n_vocab, logits, log_prob, tok) stores it: float32 scale and
    minimum log-prob in the first four uint16, then round((logit - min_logit) / scale) per token, the minimum
    clamped to the top logit - 16."""
    n_vocab = len(logits)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    hi = float(logits.max())
    lo = max(float(logits.min()), hi - 16)
    lse = math.log(float(np.exp(logits.astype(np.float64) - hi).sum()))
    scale = (hi - lo) / 65535
    row = np.zeros(nv, dtype=np.uint16)
    row[:4] = np.array([scale, lo - hi - lse], dtype=np.float32).view(np.uint16)
    row[4 : 4 + n_vocab] = np.where(logits > lo, np.rint((logits - lo) / scale), 0)
    return row


def test_kl_and_top1_are_the_textbook_figures():
    ref = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    side = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    kl, same = quality.kl_and_top1(ref, side)
    p = ref.exp()
    assert torch.allclose(kl, (p * (ref - side)).sum(-1))
    assert kl[0] > 0 and abs(float(kl[1])) < 1e-7
    assert same.tolist() == [False, True]

    scores = quality.Scores()
    scores.add(ref, side, torch.tensor([0, 2]))
    f = scores.figures()
    assert f["positions"] == 2 and f["top1"] == 0.5
    assert math.isclose(f["mean_kl"], float(kl.mean()), rel_tol=1e-6)
    assert math.isclose(f["ppl"], math.exp(-(float(side[0, 0]) + float(side[1, 2])) / 2), rel_tol=1e-6)


def test_llama_cpp_log_prob_file_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    n_ctx, n_vocab, n_chunk = 8, 7, 2  # odd vocab: rows are padded to an even count
    tokens = rng.integers(0, n_vocab, size=(n_chunk, n_ctx), dtype=np.int32)
    scored = n_ctx - 1 - n_ctx // 2
    logits = rng.normal(0, 4, size=(n_chunk, scored, n_vocab)).astype(np.float32)
    logits[0, 0, 3] = -40.0  # below the top 16 nats: stored at the floor
    path = tmp_path / "base.kld"
    with open(path, "wb") as f:
        f.write(b"_logits_" + np.array([n_ctx], np.int32).tobytes())
        f.write(np.array([n_vocab, n_chunk], np.int32).tobytes() + tokens.tobytes())
        for c in range(n_chunk):
            f.write(np.stack([llama_cpp_row(r) for r in logits[c]]).tobytes())
    read = quality.LlamaLogProbs.read(path)
    assert (read.n_ctx, read.n_vocab) == (n_ctx, n_vocab) and (read.tokens == tokens).all()
    for c in range(n_chunk):
        got = read.log_probs(c)
        want = torch.log_softmax(torch.from_numpy(logits[c]).double(), -1)
        above = want > want.max(-1, keepdim=True).values - 16
        # 16 bits over at most 16 nats: within half a step (+ float32 rounding)
        assert torch.allclose(got.double()[above], want[above], atol=16 / 65535 / 2 + 1e-5)
        assert (got.double()[~above] >= want[~above] - 1e-5).all()  # the floor, not -inf
    (tmp_path / "bad").write_bytes(b"nonsense" + bytes(12))
    with pytest.raises(ValueError, match="not a llama-perplexity"):
        quality.LlamaLogProbs.read(tmp_path / "bad")


def test_encode_rows_is_perplexity_cpp_s_16_bit_encoding():
    # max 0, min -20 clamped to -16; scale = 16/65535, 1/scale = 4095.9375 in float32: -8 lands on 32767.5, which
    # nearest_int rounds half to even (32768); -1: 15 * 4095.9375 = 61439.06 -> 61439; -20 (below the clamp): 0
    logits = np.array([[0.0, -8.0, -1.0, -20.0, -16.0]], np.float32)
    rows = quality.encode_rows(logits)
    assert rows.shape == (1, 2 * 3 + 4) and rows.dtype == np.uint16  # 5 tokens padded to 6, + 2 float32
    assert rows[0, 4:].tolist() == [65535, 32768, 61439, 0, 0, 0]
    scale, min_log_prob = rows[0, :4].copy().view(np.float32)
    lse = math.log(1 + math.exp(-8) + math.exp(-1) + math.exp(-20) + math.exp(-16))
    assert scale == np.float32(16) / np.float32(65535)
    assert min_log_prob == pytest.approx(-16 - lse, abs=1e-6)
    back = quality.decode_rows(rows, 5)[0]
    want = [-lse, -8 - lse + 0.5 * 16 / 65535, -1 - lse - 0.0625 * 16 / 65535, -16 - lse, -16 - lse]  # floored
    assert back.tolist() == pytest.approx(want, abs=2e-6)
    # a flat row: scale 0, every token 0 (memset), each log-prob the minimum, -log(n_vocab)
    flat = quality.encode_rows(np.zeros((1, 4), np.float32))
    assert flat[0, 4:].tolist() == [0, 0, 0, 0]
    assert quality.decode_rows(flat, 4)[0].tolist() == pytest.approx([-math.log(4)] * 4)

    # the test file's independent float64 writer agrees to one step; identical inputs through it: KL 0
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 5, size=(6, 33)).astype(np.float32)
    ours = quality.encode_rows(torch.from_numpy(logits))
    theirs = np.stack([llama_cpp_row(r) for r in logits])
    assert (np.abs(ours.astype(int) - theirs.astype(int)) <= 1).all() and (ours[:, :4] == theirs[:, :4]).all()
    through = quality.through_kl_base(torch.from_numpy(logits))
    kl, same = quality.kl_and_top1(through.double(), through.double())
    assert kl.abs().max() == 0 and same.all()
    # not renormalised: a log-prob moves down by at most half a step, a floored one only up
    exact = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    assert (through.double() >= exact - 16 / 65535).all()


def test_chunks_are_llama_perplexity_s():
    ids = list(range(1, 22))
    tokens = quality.tokenize_chunks(ids, 8)
    assert tokens.shape == (2, 8) and tokens[1, 0] == 9
    assert quality.chunk_ids(tokens, bos=0) == [[0, *range(2, 9)], [0, *range(10, 17)]]
    assert quality.chunk_ids(tokens, bos=None)[1] == list(range(9, 17))
    with pytest.raises(ValueError, match="needs at least 32"):
        quality.tokenize_chunks(ids, 16)


def test_table_and_verdict():
    figures = {
        "nanoseek --quant auto (= int4)": {"mean_kl": 0.03, "p99_kl": 0.4, "top1": 0.9, "ppl": 12.0, "positions": 9},
        "llama.cpp (llama-perplexity, same file)": {"mean_kl": 0.04, "p99_kl": 0.5, "top1": 0.88, "ppl": 12.1,
                                                    "positions": 9},
    }  # fmt: skip
    shown = quality.quality_table(figures)
    assert "| nanoseek --quant auto (= int4) | 0.0300 | 0.400 | 90.0% | 12.00 |" in shown
    assert "16-bit" not in shown  # no equal-terms figures: no column
    ratio, said = quality.verdict(*figures.values())
    assert ratio == pytest.approx(0.75) and said.startswith("met")
    ratio, said = quality.verdict(
        figures["llama.cpp (llama-perplexity, same file)"], figures["nanoseek --quant auto (= int4)"]
    )
    assert said.startswith("MISSED by 1.33x")
    figures["nanoseek --quant auto (= int4)"]["mean_kl_16bit"] = 0.0399
    figures["llama.cpp (llama-perplexity, same file)"]["mean_kl_16bit"] = 0.04
    shown = quality.quality_table(figures)
    assert "| nanoseek --quant auto (= int4) | 0.0300 | 0.400 | 90.0% | 12.00 | 0.039900 |" in shown
    ratio, said = quality.verdict(*figures.values(), key="mean_kl_16bit")
    assert ratio == pytest.approx(0.9975) and said.startswith("met")


def test_bad_arguments_are_one_line_errors(capsys):
    from nanoseek.cli import main

    assert main(["bench", "quality", "smollm2", "--formats", "int3"]) == 2
    assert "unknown format 'int3'" in capsys.readouterr().err
    assert main(["bench", "quality", "smollm2", "--ctx", "7"]) == 2
    assert "--ctx must be an even number" in capsys.readouterr().err


@pytest.mark.slow
def test_quality_against_llama_perplexity_on_smollm2(tmp_path, capsys):
    from nanoseek.assets import ASSETS, default_cache_dir
    from nanoseek.bench.peers import PeerMissing, find_peer
    from nanoseek.cli import main

    try:
        find_peer("llama-perplexity")
    except PeerMissing as exc:
        pytest.skip(str(exc))
    if not any(default_cache_dir().glob("models/*.gguf")) or "smollm2" not in ASSETS:
        pytest.skip("SmolLM2 is not in the cache (nanoseek fetch smollm2)")
    out_json = tmp_path / "q.json"
    assert main(["bench", "quality", "smollm2", "--max-chunks", "1", "--formats", "auto,int8,none",
                 "--json", str(out_json)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "llama.cpp's tokenization of the text and nanoseek's are the same" in out
    data = json.loads(out_json.read_text())
    f = data["figures"]
    assert f["nanoseek --quant none"]["mean_kl"] < 1e-6 and f["nanoseek --quant none"]["top1"] == 1.0
    for label in ("nanoseek --quant auto (= int4)", "nanoseek --quant int8", "llama.cpp (llama-perplexity, same file)"):
        assert 0 < f[label]["mean_kl"] < 0.2 and f[label]["top1"] > 0.8, (label, f[label])
    assert "mean KL, nanoseek --quant auto / llama.cpp" in out and "on equal terms" in out
    assert f["nanoseek --quant none"]["mean_kl_16bit"] < 1e-3 and "ratio_auto_over_llama_cpp_16bit" in data
    peer = f["llama.cpp (llama-perplexity, same file)"]
    assert peer["mean_kl_16bit"] == peer["mean_kl"]  # llama.cpp's side is through the 16-bit rows already
