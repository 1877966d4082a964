"""Storage forms of weights that stock onnxruntime decodes at session load (see `packed`)."""
