"""Model code: blind to parallelism, quantization and serving (those are applied from outside)."""
