"""SFT speed, nanoseek vs a plain transformers loop: see nanoseek/bench/sft.py (`nanoseek bench sft`)."""

from nanoseek.bench.sft import main

if __name__ == "__main__":
    main()
