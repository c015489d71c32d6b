"""One side of the decode benchmark, in its own process (see nanoseek/bench/decode.py).

Run as a script by path, not as a module, so that the llama.cpp side never imports torch or nanoseek and
its peak RSS is its own:

    python decode_worker.py '{"side": "llama.cpp", "model": "x.gguf", "threads": 2, ...}'

The parent sends one JSON task per line on stdin; the worker answers one JSON line per task on the file
descriptor that was stdout when it started (fd 1 itself is pointed at stderr, so that nothing a library
prints can corrupt the answers). Tasks:
    {"task": "single", "prompt": [ids], "max_tokens": N}   -> {"ttft", "decode_s", "tokens"}
    {"task": "batch", "prompts": [[ids]...], "max_tokens": M}  -> {"wall", "lengths", "kv_bytes"}
    {"task": "memory"}                                        -> {"peak_kb", "rss_kb"}   (peak since reset)
    {"task": "reset_peak"}                                    -> {"peak_kb", "reset"}  (peak so far; resets)
    {"task": "profile", "prompt": [ids], "steps": N}          -> {"table"} (nanoseek sides)
Sides: "nanoseek" (settings "format": fp32 | fp16 | int8, each maybe "+compile"), "transformers", "llama.cpp",
"deepseek" (a nanoseek DeepSeek-V3: "config", a named config with random weights and one MTP layer, or "model", a
folder; "mtp": true asks for MTP speculation).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is that of the generation alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM when the benchmark that started it dies (killed, or ^C'd past its
    cleanup), so no worker goes on compiling or decoding for nobody. Elsewhere it ends at its next task,
    when it reads the closed pipe."""
    try:
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl: nobody will read the answers
            sys.exit(1)
    except (OSError, AttributeError):
        pass


class NanoseekSide:
    def __init__(self, settings: dict):
        import torch

        import nanoseek
        from nanoseek.quant import linear_weight_bytes, quantize_model

        self.torch = torch
        torch.set_num_threads(settings["threads"])
        fmt = settings.get("format", "fp32").partition("+")[0]
        self.compile = compiled(settings)  # decode steps through torch.compile (engine/runner.CompiledDecode)
        if settings["side"] == "deepseek" and "model" in settings:
            self.model = nanoseek.load(settings["model"]).eval()
        elif settings["side"] == "deepseek":
            from nanoseek.model.config import from_name
            from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM

            torch.manual_seed(0)
            self.model = DeepseekV3ForCausalLM(from_name(settings["config"], num_nextn_predict_layers=1)).eval()
            if fmt != "fp32":
                quantize_model(self.model, fmt)
        else:  # quantized formats are packed while loading, as `nanoseek generate --quant` does
            self.model = nanoseek.load(settings["model"], quant=None if fmt == "fp32" else fmt)
        self.weights_bytes = linear_weight_bytes(self.model)
        self.engine_options = speculation_options(settings.get("mtp", False))
        self.engine_options["kv_cache_dtype"] = settings.get("kv_cache_dtype", "auto")

    def engine(self, num_seqs: int, tokens_per_seq: int):
        """A fresh engine (no prefix cache carried over between repeats) whose KV cache holds exactly the
        task: num_seqs sequences of tokens_per_seq tokens, plus the reserved padding block."""
        from dataclasses import replace

        from nanoseek.engine.engine import Engine, EngineConfig, cache_blocks

        config = EngineConfig(block_size=16, max_num_seqs=num_seqs, compile=self.compile, **self.engine_options)
        config = replace(config, num_blocks=cache_blocks(self.model, config, num_seqs, tokens_per_seq))
        engine = Engine(self.model, config, eos_ids=[])
        kv_bytes = sum(t.numel() * t.element_size() for ts in engine.runner.storage.tensors.values() for t in ts)
        return engine, kv_bytes

    def read_bytes(self, depth: int) -> dict:
        """What one single-stream decode step at `depth` reads from memory: every weight in its run format but the
        input embedding table (a step reads one row of it; a tied head's table is counted as the head), and
        `depth` positions of the KV cache in every layer (an upper bound for sliding-window layers)."""
        from torch import nn

        seen, weights = set(), 0
        for m in self.model.modules():
            if isinstance(m, nn.Embedding) or type(m).__name__.endswith("Embedding"):
                continue
            tensors = list(m.parameters(recurse=False))
            if type(m).__name__.endswith("Linear"):  # packed formats keep their weights as buffers
                tensors += list(m.buffers(recurse=False))
            for t in tensors:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    weights += t.numel() * t.element_size()
        engine, _ = self.engine(1, depth + 1)
        per_position = sum(t[0].numel() * t.element_size() for ts in engine.runner.storage.tensors.values() for t in ts)
        return {"weights": weights, "kv": per_position * depth}

    def single(self, prompt: list[int], max_tokens: int) -> dict:
        from nanoseek.engine.sampling import SamplingParams

        engine, _ = self.engine(1, len(prompt) + max_tokens)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        rid = engine.add_request(prompt, params)
        first = None
        while engine.has_work():
            engine.step()
            if first is None and engine.get(rid).output_ids:  # a long prompt takes several steps
                first = time.perf_counter()
        end = time.perf_counter()
        stats = engine.stats()
        return {"ttft": first - t0, "decode_s": end - first, "tokens": engine.get(rid).output_ids,
                "drafted": stats["num_drafted"], "accepted": stats["num_accepted"]}  # fmt: skip

    def batch(self, prompts: list[list[int]], max_tokens: int) -> dict:
        from nanoseek.engine.sampling import SamplingParams

        engine, kv_bytes = self.engine(len(prompts), max(map(len, prompts)) + max_tokens)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        completions = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        return {"wall": wall, "lengths": [len(c.token_ids) for c in completions], "kv_bytes": kv_bytes}

    def profile(self, prompt: list[int], steps: int) -> dict:
        """torch.profiler over `steps` single-stream decode steps: where a token's time goes."""
        from torch.profiler import ProfilerActivity, profile

        from nanoseek.engine.sampling import SamplingParams

        engine, _ = self.engine(1, len(prompt) + steps + 1)
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
        engine.step()  # the prefill stays out of the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while engine.has_work():
                engine.step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        events = prof.key_averages()
        total_us = sum(e.self_cpu_time_total for e in events)
        kernels = ("aten::addmm", "aten::mm", "aten::linear", "aten::_int_mm", "aten::bmm", "aten::matmul",
                   "quantized::linear_dynamic_fp16")  # fmt: skip
        matmul_us = sum(e.self_cpu_time_total for e in events if e.key in kernels)
        calls = sum(e.count for e in events if e.key.startswith("aten::"))
        return {"table": table, "total_us": total_us, "matmul_us": matmul_us, "aten_calls": calls, "steps": steps}


def speculation_options(mtp: bool) -> dict:
    """EngineConfig keywords for MTP speculation, or none: one draft a step, as many as the model has MTP depths
    (more re-apply depth 1 to its own guesses; see nanoseek/eval/speculation.py)."""
    return {"speculative": "mtp", "num_speculative_tokens": 1} if mtp else {}


class TransformersSide:
    def __init__(self, settings: dict):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        torch.set_num_threads(settings["threads"])
        path = settings["model"]
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()
        gen = self.model.generation_config
        gen.eos_token_id = None  # ignore_eos: every stream runs to max_tokens, like the other sides
        gen.pad_token_id = 0
        gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
        self.weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _generate(self, ids, max_tokens: int, streamer=None):
        with self.torch.inference_mode():
            return self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                do_sample=False, use_cache=True, streamer=streamer,
            )  # fmt: skip

    def single(self, prompt: list[int], max_tokens: int) -> dict:
        class Clock:  # a streamer that only timestamps: its first put() is the prompt, then one per token
            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        clock = Clock()
        ids = self.torch.tensor([prompt])
        t0 = time.perf_counter()
        out = self._generate(ids, max_tokens, clock)
        end = time.perf_counter()
        first = clock.times[1]
        return {"ttft": first - t0, "decode_s": end - first, "tokens": out[0, len(prompt) :].tolist()}

    def batch(self, prompts: list[list[int]], max_tokens: int) -> dict:
        if len(set(map(len, prompts))) != 1:
            raise ValueError("the transformers side takes equal-length prompts (no padding)")
        ids = self.torch.tensor(prompts)
        t0 = time.perf_counter()
        out = self._generate(ids, max_tokens)
        wall = time.perf_counter() - t0
        return {"wall": wall, "lengths": [out.shape[1] - ids.shape[1]] * len(prompts), "kv_bytes": None}


class LlamaCppSide:
    """llama.cpp in-process through llama-cpp-python: the GGUF as it is (Q4_1 kernels), greedy, token ids in."""

    def __init__(self, settings: dict):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=settings["model"], n_ctx=settings["n_ctx"], n_batch=512, n_threads=settings["threads"],
            n_threads_batch=settings["threads"], verbose=False,
        )  # fmt: skip
        self.weights_bytes = os.path.getsize(settings["model"])
        self.version = __import__("llama_cpp").__version__

    def single(self, prompt: list[int], max_tokens: int) -> dict:
        self.llm.reset()  # n_tokens = 0: generate() cannot reuse the previous run's cache as a prefix
        times, tokens = [], []
        t0 = time.perf_counter()
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == max_tokens:
                break
        return {"ttft": times[0] - t0, "decode_s": times[-1] - times[0], "tokens": tokens}

    def batch(self, prompts: list[list[int]], max_tokens: int) -> dict:
        if len(prompts) != 1:
            raise ValueError("llama-cpp-python's Python API runs one sequence at a time")
        t0 = time.perf_counter()
        out = self.single(prompts[0], max_tokens)
        return {"wall": time.perf_counter() - t0, "lengths": [len(out["tokens"])], "kv_bytes": None}

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)


LIBRARIES = {"nanoseek": ("torch", "nanoseek.engine.engine"), "deepseek": ("torch", "nanoseek.engine.engine"),
             "transformers": ("torch", "transformers"), "llama.cpp": ("llama_cpp",)}  # fmt: skip
# a compiled side's libraries include torch.compile's own (dynamo, inductor and what they import: ~115 MB of
# RSS on the development machine), imported on first use otherwise; its compiled graphs and kernels are not
COMPILER = ("torch._dynamo", "torch._inductor.compile_fx", "torch._inductor.codecache")


def compiled(settings: dict) -> bool:
    """Whether the side is a nanoseek run format with its decode compiled ("int8+compile")."""
    return settings.get("format", "").partition("+")[2] == "compile"


def libraries(settings: dict) -> tuple[str, ...]:
    return LIBRARIES[settings["side"]] + (COMPILER if compiled(settings) else ())


SIDES = {"nanoseek": NanoseekSide, "deepseek": NanoseekSide, "transformers": TransformersSide,
         "llama.cpp": LlamaCppSide}  # fmt: skip


def serve(settings: dict, answers) -> None:
    def answer(obj: dict) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    try:
        # the libraries first, so that the baseline separates their memory from the model's
        for module in libraries(settings):
            __import__(module)
        baseline_kb = _status_kb("VmRSS")
        side = SIDES[settings["side"]](settings)
    except Exception as exc:  # noqa: BLE001 - the parent reports it as the side's error
        answer({"error": f"{type(exc).__name__}: {exc}"})
        return
    load_peak_kb = _status_kb("VmHWM")
    answer({
        "ready": True, "baseline_kb": baseline_kb, "load_peak_kb": load_peak_kb, "loaded_kb": _status_kb("VmRSS"),
        "weights_bytes": side.weights_bytes, "peak_resettable": _reset_peak(),
        "version": getattr(side, "version", None),
    })  # fmt: skip
    for line in sys.stdin:
        task = json.loads(line)
        kind = task.pop("task")
        try:
            if kind == "memory":
                answer({"peak_kb": _status_kb("VmHWM"), "rss_kb": _status_kb("VmRSS")})
            elif kind == "reset_peak":  # the peak so far (e.g. a warm-up's), then start a new one
                answer({"peak_kb": _status_kb("VmHWM"), "reset": _reset_peak()})
            elif kind == "tokenize":
                answer({"tokens": side.tokenize(task["text"])})
            else:
                answer(getattr(side, kind)(**task))
        except Exception as exc:  # noqa: BLE001 - the parent reports it as the side's error
            answer({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    _die_with_parent()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the answers
    sys.stdout = sys.stderr
    serve(json.loads(sys.argv[1]), answers)
