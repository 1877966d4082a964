"""Low-rank factorization (truncated SVD) of MatMul, Gemm and Conv weights, only where it pays.

Denton et al. 2014, "Exploiting Linear Structure Within Convolutional Networks for Efficient
Evaluation"; Jaderberg et al. 2014 (spatial k×1 / 1×k separation). Modules:

* `linalg`   — exact and seeded randomized truncated SVD, energy rank, the no-saving bound.
* `decompose` — the factors of one weight (matrix, Conv channel, Conv spatial) and their costs.
* `plan`     — the serialisable plan: per layer the kind, rank and predicted params/FLOPs.
* `rewrite`  — applies one planned layer to the graph (one node becomes two).
* `latency`  — measures the original node against the factor pair with onnxruntime.
* `budget`   — the greedy per-layer search for a fidelity budget (AIMET-style).
* `svd`      — the `lowrank.svd` pass that ties them together.
"""
