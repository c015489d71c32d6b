"""Serving speed, `nanoseek serve` vs llama.cpp's server: see nanoseek/bench/serve.py
(`nanoseek bench serve [MODEL]`)."""

from nanoseek.bench.serve import main

if __name__ == "__main__":
    main()
