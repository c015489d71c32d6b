"""One batched forward over the paged cache: rows of new tokens in, each row's next-token logits out.

The model sees a right-padded [B, T] batch, the positions of its new tokens and a `PagedView`, and returns
logits only at each row's last new token (a prefill chunk of 500 tokens needs one row of logits, not 500),
or at its last few when it verifies speculative drafts.
It works for every nanoseek model: the dense families cache k and v per layer, DeepSeek-V3 caches MLA's
compressed c_kv and k_pe (kv_lora_rank + qk_rope_head_dim values per token and layer).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.engine import fused_ops, paged_attention
from nanoseek.engine.kv_cache import BlockPool, CacheSpec, KVLayout, PagedStorage, PagedView
from nanoseek.engine.kv_groups import SequenceBlocks
from nanoseek.engine.layer_stack import DenseStack
from nanoseek.memory import return_freed_memory


@dataclass
class Row:
    table: SequenceBlocks  # the sequence's blocks, one table per layer group
    past_len: int  # tokens already in the cache
    token_ids: Sequence[int]  # the new tokens, at positions past_len..
    num_logits: int = 1  # logits wanted at this many last new tokens (1 + drafts when verifying)
    adapter: int = 0  # the LoRA adapter the row runs (engine/lora.py; 0: the base model)


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [B, n, V] fp32, right-aligned: row i's num_logits are logits[i, n - num_logits:]
    hidden: torch.Tensor | None  # [B, T, d] final-normed hidden states of every new token (when asked)
    view: PagedView  # the cache view it ran with (MTP drafting runs its own layer over the same positions)
    past_lens: list[int]  # each row's first new position

    def row_logits(self, i: int, num_logits: int) -> torch.Tensor:
        """Row i's logits at its last num_logits new tokens: [num_logits, V]."""
        return self.logits[i, self.logits.shape[1] - num_logits :]


def cache_layout(model, *, mtp: bool = False) -> tuple[CacheSpec, list[int | None]]:
    """What the model caches per token and layer, and each cache layer's attention window (None: full).
    mtp: DeepSeek's MTP modules get cache layers too, after the main ones (their blocks' layer_idx is
    num_hidden_layers + k), for MTP drafting."""
    cfg = model.config
    if hasattr(cfg, "kv_lora_rank"):  # DeepSeek-V3 / V2: MLA's latent cache
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        spec = CacheSpec(layers, {"c_kv": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)})
        return spec, [None] * layers
    kv = (cfg.num_key_value_heads, cfg.head_dim)
    windows = [cfg.sliding_window if kind == "sliding_attention" else None for kind in cfg.layer_types]
    return CacheSpec(cfg.num_hidden_layers, {"k": kv, "v": kv}), windows


def paged_attention_applies(model) -> bool:
    """Whether the model's decode attention can run in the paged attention kernel (given an fp32 cache on CPU): a
    dense model (DeepSeek's MLA attends over its latent cache its own way), on a CPU where the kernel builds."""
    return not hasattr(model.config, "kv_lora_rank") and paged_attention.available()


KV_CACHE_DTYPES = ("auto", "model", "fp16")


def kv_cache_dtype(model, choice: str = "auto", *, fused_attention: bool = True) -> torch.dtype:
    """The KV cache's dtype for `choice`: "model" the weights' dtype (fp32 on CPU); "fp16" half the bytes, for a
    dense model with fp32 weights on CPU, whose paged attention kernel reads fp16 rows (each key and value rounded
    once, when written; then the fp32 kernel's arithmetic, so batch invariance holds); "auto" fp16 where that
    kernel runs and the weights run quantized (int4/int8/fp16: their logits are already further from the fp32
    model's than the cache's rounding moves them, and llama.cpp's default cache is f16 too), else the weights'
    dtype, so an fp32 model decodes exactly as transformers does."""
    if choice not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {choice!r}")
    weight = next(model.parameters())
    kernel = (
        fused_attention and weight.device.type == "cpu" and weight.dtype == torch.float32
        and paged_attention_applies(model)
    )  # fmt: skip
    if choice == "model" or (choice == "auto" and not (kernel and getattr(model, "quantization", None))):
        return weight.dtype
    if not kernel:
        raise ValueError(
            "kv_cache_dtype='fp16' needs the paged attention kernel: a dense model (not DeepSeek's MLA) with fp32 "
            "weights on the CPU, fused_attention on; use 'auto' or 'model'"
        )
    return torch.float16


class ModelRunner:
    def __init__(
        self,
        model,
        pool: BlockPool,
        autocast_dtype: torch.dtype | None = None,
        *,
        mtp: bool = False,
        compile_decode: bool = False,
        fused_attention: bool = True,
        kv_dtype: torch.dtype | None = None,  # the cache's (kv_cache_dtype's choice; None: the weights')
    ):
        self.model = model.eval()  # eval: the router's balancing statistics never move at inference
        weight = next(model.parameters())  # the embedding (linears may be quantized modules without .weight)
        self.device = weight.device
        self.decode_model = CompiledDecode(model, self.device) if compile_decode else None
        self.autocast_dtype = autocast_dtype
        self.spec, self.layer_windows = cache_layout(model, mtp=mtp)
        self.layout = KVLayout.of(self.layer_windows)
        self.kv_dtype = kv_dtype or weight.dtype
        self.storage = PagedStorage(self.spec, pool, self.kv_dtype, self.device, self.layout)
        # compute the forwards whose rows are all decodes or verifications (logits at every new token) query by
        # query (PagedView.query_spans); the engine turns it on for speculative decoding
        self.row_wise = False
        fp32_cpu = self.device.type == "cpu" and weight.dtype == torch.float32
        # dense models attend in the paged attention kernel (engine/paged_attention.py) in every forward: decodes,
        # verifications and prompt chunks, each query from its own keys in one order (batch invariance)
        self.fused_attention = fused_attention and fp32_cpu and paged_attention_applies(model)
        # RMSNorm in one op, and with the paged attention kernel the rotary embedding and cache write fused too
        # (engine/fused_ops.py): eager fp32 inference on CPU (not under autocast, whose activations are 16-bit)
        fused = fp32_cpu and autocast_dtype is None and fused_ops.install(model)
        self.fused_qkv = self.fused_attention and fused
        self.layer_stack = DenseStack.of(model) if self.fused_qkv else None

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @torch.inference_mode()
    def forward(self, rows: Sequence[Row], *, hidden: bool = False) -> ForwardResult:
        """Logits (fp32) at each row's last `num_logits` new tokens; hidden: also every new token's final-normed
        hidden state (DeepSeek models only: MTP drafting needs it)."""
        new_lens = [len(r.token_ids) for r in rows]
        T = max(new_lens)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : new_lens[i]] = torch.as_tensor(list(r.token_ids), dtype=torch.long)
        row_wise = self.row_wise and all(r.num_logits == n for r, n in zip(rows, new_lens))
        view = self.storage.view([r.table for r in rows], [r.past_len for r in rows], new_lens, row_wise=row_wise)
        view.fused_attention = self.fused_attention
        n = max(r.num_logits for r in rows)
        # row i's last n positions (clamped at 0: a row with fewer wanted repeats its first, then ignores it)
        index = (torch.tensor(new_lens)[:, None] - n + torch.arange(n)[None, :]).clamp(min=0).to(self.device)
        ids = ids.to(self.device)
        # decode steps (one new token per row, no drafts) take the compiled model when there is one; prompt
        # chunks and draft verification stay eager (their shapes vary more, and they are not per-token costs),
        # and so do row-wise views, whose per-query Python loop would be traced and guarded afresh every step
        # rows with LoRA adapters run eagerly (engine/lora.py): the compiled graph is the base model's
        lora = _lora_rows(self.model, rows)
        decoding = self.decode_model is not None and T == 1 and n == 1 and not hidden and not row_wise and lora is None
        model = self.decode_model if decoding else self.model
        # a compiled step keeps the unfused rotary embedding and cache write: inductor fuses them itself, and the
        # fused op writes the cache in place, which the compiled graph would have to functionalize
        view.fused_qkv = self.fused_qkv and view.fused_attention and not decoding
        view.layer_stack = self.layer_stack if view.fused_qkv and lora is None else None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None), lora or contextlib.nullcontext():  # fmt: skip
            if hidden:
                logits, h = model(ids, cache=view, logits_index=index, return_hidden=True)
            else:
                logits, h = model(ids, cache=view, logits_index=index), None
        return ForwardResult(logits.float(), h, view, [r.past_len for r in rows])


def _lora_rows(model, rows: Sequence[Row]):
    """The context that gives each row its LoRA adapter for the forward, or None when every row runs the base
    (then the forward does no LoRA work at all)."""
    if not any(r.adapter for r in rows):
        return None
    return model.lora_adapters.rows([r.adapter for r in rows], next(model.parameters()).device)


class CompiledDecode:
    """`model`'s forward under torch.compile, for decode steps. Inductor fuses each layer's norms, activation
    quantization, rotary embedding, cache write and gathers into a few kernels around the matmuls, where
    eager decode runs ~60 small ops per layer (on the 2-core CPU those ops, not the matmuls, were most of a
    SmolLM2 token). Shapes are dynamic (batch size and history length change every step), so it compiles
    once for one row and once for several, not per step. The first decode step pays the compilation (tens
    of seconds on 2 cores; inductor caches its kernels on disk for the next process), or `Engine.warm_up`
    does, as the server does before it takes requests. On CPU the kernels are called from C++, not Python
    (`_wrapper_options`).

    A model that traces as one graph (the dense families) runs without guards on its modules' attributes:
    checking ~300 parameters' metadata before every step cost ~1 ms of an 8 ms token. Compiled code is
    cached per code object, not per model, so each model (and run format) gets its own key, a constant the
    compiled function reads and so is guarded on. A model with eager parts (DeepSeek's routed experts,
    `torch.compiler.disable`d) breaks into several graphs, one per layer code object, which only full
    guards keep apart (layer 0's dense MLP and layer 1's MoE share `forward`'s code): it keeps them."""

    def __init__(self, model, device: torch.device):
        from nanoseek.model.moe import experts_outside_graph

        experts_outside_graph()  # routed experts run eagerly, between graphs (built before tracing)
        self.model = model
        self.key = f"{_model_key(model)}:{getattr(model, 'quantization', None)}"
        self.options = _wrapper_options(device)
        skip_module_guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self.one_graph = torch.compile(
            self._decode, dynamic=True, fullgraph=True, options={**skip_module_guards, **self.options}
        )
        self.guarded = None  # set when the model does not trace as one graph

    def _decode(self, key: str, ids, cache, logits_index):
        if not key:  # reads the key, so the compiled graph is guarded on it
            raise ValueError("compiled decode needs a model key")
        return self.model(ids, cache=cache, logits_index=logits_index)

    def __call__(self, ids, cache, logits_index):
        graphs = _compiled_graphs()
        if self.guarded is None:
            try:
                logits = self.one_graph(self.key, ids, cache, logits_index)
            except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):  # a graph break; nothing ran
                self.guarded = torch.compile(self.model, dynamic=True, options=self.options)  # full guards
        if self.guarded is not None:
            logits = self.guarded(ids, cache=cache, logits_index=logits_index)
        if _compiled_graphs() != graphs:
            # compiling freed a lot of short-lived memory (traces, generated code) into holes of the heap, where
            # it stayed resident: ~40 MB for SmolLM2's two graphs (947 -> 905 MB RSS, measured)
            return_freed_memory()
        return logits


def _compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _wrapper_options(device: torch.device) -> dict:
    """Inductor options for the code that calls the compiled kernels. On CPU it is C++ (`cpp_wrapper`), not
    Python: a SmolLM2 decode step runs ~300 kernels and library calls (4 matmuls, attention and 4-5 fused
    kernels per layer), and between them the Python wrapper allocated buffers, checked strides and called
    ops through the boxed dispatcher. That cost ~1 ms a token (a 30-layer model with 64-wide layers decoded
    at 1.1 ms a token, all of it overhead), and with 2 threads it also left the second thread waiting in
    every parallel region: the C++ wrapper made SmolLM2 int8 decode 1.28x faster on 2 threads (7.27 -> 5.70
    ms a token, 200-token prompt). Built separately from the kernels, the wrapper compiles as fast as the
    Python one (46 against 48 s from an empty cache on 2 cores). GPUs keep the Python wrapper (not measured here:
    no GPU was available)."""
    if device.type != "cpu":
        return {}
    return {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


_model_keys = itertools.count()


def _model_key(model) -> int:
    """A number of this model object's own, for the life of the process (id() can be reused)."""
    if not hasattr(model, "_compile_key"):
        model._compile_key = next(_model_keys)
    return model._compile_key
