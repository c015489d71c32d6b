"""The speedrun's report card figures for the final model: greedy and sampled pass@k on the held-out problems,
and its MTP module as its own drafter."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nanoseek.train.scoring import GREEDY_EVAL_BATCH, SCORING_FORMATS, heldout_specs

if TYPE_CHECKING:
    from nanoseek.train.speedrun import StageContext, StageResult

# The final model's sampled evaluation: the run's eval.samples completions per problem at eval.temperature, on the
# first eval.sampled_examples of the greedy evaluation's problems (train/config.py EvalConfig), FINAL_EVAL_BATCH
# sequences decoded together. Measured on the 2-core CPU (shared with other jobs, load ~4) with a default run's
# GRPO model, add2 + sort: 400 problems x 8 samples took 36-52 s at batch 512 and 80-88 s at 3,200 (the decode
# steps are compute-bound); with 200 problems sampled, the whole final_evaluation (model load, greedy on 400,
# sampled on 200) took 45-57 s, when it still scored the greedy answers again (it now reuses the stage's).
FINAL_EVAL_BATCH = 512
# The MTP drafter's figure (nanoseek.eval.speculation): this many held-out problems (split over the GRPO tasks),
# each decoded alone, plain and with MTP speculation, in this many alternating rounds.
SPECULATION_PROBLEMS = 16
SPECULATION_ROUNDS = 3
SPECULATION_MAX_TOKENS = 32


def final_evaluation(final: StageResult, ctx: StageContext) -> dict[str, Any]:
    """The final model on every task's held-out problems through nanoseek.eval, in its stage's scoring format:
    greedy pass@1 with a Wilson interval (the stage's own score, as score_stage's evaluation found it; scored
    again only when the stage holds no such evaluation), then eval.samples completions of each of the first
    eval.sampled_examples at eval.temperature for pass@1 and pass@samples with bootstrap intervals, and the MTP
    module as the model's own drafter."""
    import nanoseek
    from nanoseek.eval import evaluate
    from nanoseek.meter import make_energy_counter
    from nanoseek.tokenizer import load_tokenizer

    cfg, device = ctx.train_config, ctx.device
    start, energy = time.perf_counter(), make_energy_counter(device, cfg.watts_per_core)
    model = nanoseek.load(final.model_dir, device=device)
    tok = load_tokenizer(final.model_dir)
    fmt = SCORING_FORMATS[final.format]
    specs, ev = heldout_specs(cfg.data.tasks, cfg), cfg.eval
    greedy = stage_greedy_results(final, [spec.name for spec in specs], fmt)
    if greedy is None:
        greedy = evaluate(model, tok, specs, limit=ev.examples, batch_size=GREEDY_EVAL_BATCH, **fmt)
    sampled = evaluate(model, tok, specs, limit=min(ev.examples, ev.sampled_examples), samples=ev.samples,
                       k=sorted({1, ev.samples}), temperature=ev.temperature, batch_size=FINAL_EVAL_BATCH,
                       **fmt)  # fmt: skip
    speculation = speculation_figures(model, tok, specs, fmt)
    return {
        "stage": final.name,
        "wall_s": time.perf_counter() - start,
        "energy_j": float(energy.joules()),
        "greedy": {name: r.to_dict() for name, r in greedy.items()},
        "sampled": {name: r.to_dict() for name, r in sampled.items()},
        "speculation": None if speculation is None else speculation.to_dict(),
    }


def stage_greedy_results(final: StageResult, names: list[str], fmt: dict[str, Any]) -> dict[str, Any] | None:
    """The nanoseek.eval results behind the stage's own scores (score_stage: the same held-out problems, greedy, in
    the same format and batch), by task; None unless every task has one in `fmt`."""
    results = {name: getattr(final.eval.get(name), "result", None) for name in names}
    for r in results.values():
        if r is None or r.samples != 1 or r.settings.get("temperature") != 0:
            return None
        if r.settings.get("format") != fmt["format"] or r.settings.get("system_prompt") != fmt.get("system_prompt"):
            return None
    return results


def speculation_figures(model, tok, specs: list[Any], fmt: dict[str, Any]):
    """The final model's MTP module as its own drafter (nanoseek.eval.speculation) on held-out problems of the
    evaluation's tasks (`specs`) in its format, each decoded alone until its end token; None without an MTP
    module."""
    from nanoseek.eval.runner import synthetic_problems
    from nanoseek.eval.speculation import measure_mtp_speculation

    per_task = max(1, SPECULATION_PROBLEMS // len(specs))
    prompts = []
    for spec in specs:
        problems = synthetic_problems(tok, spec.task, fmt["format"], spec.task.eval_examples(per_task),
                                      fmt.get("system_prompt"))  # fmt: skip
        prompts += [p.prompt for p in problems]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return measure_mtp_speculation(model, prompts, eos, SPECULATION_MAX_TOKENS, rounds=SPECULATION_ROUNDS)
