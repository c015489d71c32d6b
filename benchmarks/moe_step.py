"""One MoE training step, nanoseek vs transformers: see nanoseek/bench/moe_step.py (`nanoseek bench moe-step`)."""

from nanoseek.bench.moe_step import main

if __name__ == "__main__":
    main()
