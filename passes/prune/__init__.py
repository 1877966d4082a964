"""Pruning: unstructured (magnitude, saliency) and structured (neurons, channels)."""
