"""`nanoseek sft MODEL DATA --out DIR [--set key=value ...] [--resume] [--parallel ddp|fsdp]`

nanoseek sft smollm2 chats.jsonl --out runs/sft --set max_steps=100 --set optim.lr=5e-5
nanoseek sft smollm2 chats.jsonl --out runs/lora --lora --set lora.rank=8 --merge
torchrun --nproc-per-node 8 -m nanoseek sft ./my-model data/ --out runs/sft --parallel fsdp
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on chat JSONL (loss on assistant tokens, packed sequences)",
        description='Fine-tune a model on OpenAI-style chat JSONL ({"messages": [...]} per line). The model\'s own '
        "chat template renders the data; the loss falls on the assistant's tokens only. The result is DIR/model, "
        "a HF folder with tokenizer and chat template.",
    )
    p.add_argument("model", help="a HF model folder, a .gguf file (dequantized for training), or a known name "
                                 "(smollm2, gemma3-270m)")  # fmt: skip
    p.add_argument("data", help='a .jsonl file of {"messages": [...]} objects, or a folder of them')
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, model/")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a `nanoseek train` setting or epochs/batch_size, e.g. --set epochs=2 --set optim.lr=5e-5 "
        "(defaults: 3 epochs, 8 conversations per step, lr 2e-5 with 5%% warmup); bare or prefixed sft.KEY as "
        "`nanoseek speedrun --set` takes them (sft.optim.lr=5e-5 is optim.lr=5e-5)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--parallel", default="auto", choices=["auto", "none", "ddp", "fsdp"],
        help="data parallelism under torchrun: ddp (replicas) or fsdp (FSDP2 sharding); auto = ddp",
    )  # fmt: skip
    add_lora_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_lora_arguments(p: argparse.ArgumentParser) -> None:
    """--lora and --merge, as `nanoseek sft` and `nanoseek grpo` both take them."""
    p.add_argument(
        "--lora", action="store_true",
        help="train a LoRA adapter on the frozen model instead of every weight: DIR/adapter, a PEFT folder "
        "(defaults rank 16, alpha 32, dropout 0, lr 10x the full fine-tuning default; --set lora.rank=8, "
        "lora.alpha, lora.dropout, lora.target_modules=[q_proj,v_proj]; lora.base_format=auto|int4|fp32: int4 is "
        "QLoRA-style, the frozen base's forward on the 4-bit kernel, faster but with the activations rounded to "
        "int8 per block of 32, for a packed copy of the base beside it (~1/6 of its fp32 bytes), the gradients "
        "still from fp32; auto, the default, picks int4 when the base's weights are on the 4-bit grid already, "
        "as a 4-bit GGUF file's are, fp32 otherwise)",
    )  # fmt: skip
    p.add_argument("--merge", action="store_true",
                   help="with --lora: also write DIR/model, a full HF folder with the adapter folded in")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from nanoseek.parallel import leaving_process_group
    from nanoseek.train.sft import run_sft

    with leaving_process_group():
        result = run_sft(
            args.model, args.data, args.out, args.overrides, show_progress=not args.quiet, device=args.device,
            resume=args.resume, parallel=args.parallel, lora=args.lora, merge=args.merge,
        )  # fmt: skip
    if result.adapter_dir is not None:
        print(f"LoRA adapter (PEFT folder): {result.adapter_dir}")
    if result.adapter_dir != result.model_dir:
        print(f"fine-tuned model: {result.model_dir}")
    return 0
