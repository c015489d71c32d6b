"""Decode speed, nanoseek's engine vs llama.cpp vs transformers: see nanoseek/bench/decode.py
(`nanoseek bench decode MODEL`)."""

from nanoseek.bench.decode import main

if __name__ == "__main__":
    main()
