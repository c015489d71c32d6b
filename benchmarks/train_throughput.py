"""Training throughput, nanoseek vs transformers: see nanoseek/bench/train_throughput.py
(`nanoseek bench train-throughput`)."""

from nanoseek.bench.train_throughput import main

if __name__ == "__main__":
    main()
