"""Sparse and weight-shared layers as custom ops of domain ai.onnxcompress (see docs/kernels.md)."""
