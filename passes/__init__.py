"""Compression algorithms, installed as `onnxcompress.passes`; each module registers its passes."""
