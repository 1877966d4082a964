"""How compressed weights are represented in an ONNX graph: the layer below the engine.

Nothing here knows an algorithm; everything above (sites, summary, the archive, the fine-tune
bridge, the passes) reads and writes these forms through this package.

* `codebook`: a weight-shared layer, Cast(indices) -> Gather(codebook); find, read, insert, remove.
* `packed`: codebook indices bit-packed at their width, float16 storage; both decoded by
  standard ops that onnxruntime constant-folds at load.
* `kernel_arrays`: the CSR / packed-index arrays the `ai.onnxcompress` kernels read, and their
  numpy references.
* `conv_layout`: SparseConv's layout (a Conv weight as CSR of its flattened filters), its
  geometry and numpy reference.
* `kernel_ops`: ONE table of the kernel ops (name, inputs, attributes, portable body), which the
  C++ library, runtime, summary, sites and the sparse pass are checked against.
* `kernel_reference`: the ops for `onnx.reference.ReferenceEvaluator` (test oracles).
* `detect`: the one detector of a coded weight (codebook-decoded or kernel-held).
"""
