"""Layer-wise reconstruction from calibration data: OBS pruning (SparseGPT) and GPTQ codebooks."""
