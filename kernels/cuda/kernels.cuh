// Device kernels of the onnxcompress CUDA ops (host launchers; no onnxruntime types here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace onnxcompress {
namespace cuda {

// Y[m, n] = sum_j values[j] * X[m, cols[j]] over row n of W^T's CSR (+ bias[n]).
// `values` is nullptr for the codebook form, where value j = codebook[indices[j]].
template <typename Index>
cudaError_t SparseMatMul(cudaStream_t stream, const float* x, int64_t m, int64_t k, int64_t n, const float* values,
                         const uint8_t* indices, const float* codebook, int64_t codebook_size, const Index* cols,
                         const int32_t* row_ptr, const float* bias, float* y);

// Y = X . codebook[indices] (+ bias); indices are W^T rows (bits = 8) or 4-bit pairs (bits = 4).
cudaError_t CodebookMatMul(cudaStream_t stream, const float* x, int64_t m, int64_t k, int64_t n,
                           const uint8_t* indices, int bits, const float* codebook, int64_t codebook_size,
                           const float* bias, float* y);

// First problem in a CSR structure, or kind = 0. Kinds: 1 row_ptr[0] != 0, 2 decreasing at
// `position`, 3 row_ptr[N] != nnz, 4 column out of range at `position`, 5 codebook index out of
// range at `position`. `value` is the offending value.
struct CsrProblem {
  int kind;
  int64_t position;
  int64_t value;
};

template <typename Index>
cudaError_t ValidateCsr(cudaStream_t stream, const int32_t* row_ptr, int64_t n, const Index* cols, int64_t nnz,
                        int64_t k, const uint8_t* indices, int64_t codebook_size, CsrProblem* problem);

}  // namespace cuda
}  // namespace onnxcompress
