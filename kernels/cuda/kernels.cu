// CUDA kernels for SparseMatMul, SparseCodebookMatMul and CodebookMatMul.
//
// One warp per (output neuron n, batch row m): the lanes stride over row n's non-zeros (or its
// packed indices), gather X[m, col], and reduce with shuffles. Simple and exact (fp32 sums in
// another order than dense MatMul); a first GPU version, not tuned: there was no GPU to tune on.
#include "kernels.cuh"

#include <climits>

namespace onnxcompress {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

__device__ inline float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename Index>
__global__ void SparseMatMulKernel(const float* __restrict__ x, int64_t m, int64_t k, int64_t n,
                                   const float* __restrict__ values, const uint8_t* __restrict__ indices,
                                   const float* __restrict__ codebook, const Index* __restrict__ cols,
                                   const int32_t* __restrict__ row_ptr, const float* __restrict__ bias,
                                   float* __restrict__ y) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t batch = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  if (row >= n || batch >= m) return;
  const float* xr = x + batch * k;
  float sum = 0.0f;
  for (int64_t j = row_ptr[row] + lane; j < row_ptr[row + 1]; j += kWarp) {
    const float v = values ? values[j] : codebook[indices[j]];
    sum += v * xr[static_cast<int64_t>(cols[j])];
  }
  sum = WarpSum(sum);
  if (lane == 0) y[batch * n + row] = sum + (bias ? bias[row] : 0.0f);
}

__global__ void CodebookMatMulKernel(const float* __restrict__ x, int64_t m, int64_t k, int64_t n,
                                     const uint8_t* __restrict__ indices, int bits,
                                     const float* __restrict__ codebook, int64_t codebook_size,
                                     const float* __restrict__ bias, float* __restrict__ y) {
  __shared__ float table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = i < codebook_size ? codebook[i] : 0.0f;
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t batch = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  if (row >= n || batch >= m) return;
  const float* xr = x + batch * k;
  float sum = 0.0f;
  if (bits == 8) {
    const uint8_t* r = indices + row * k;
    for (int64_t j = lane; j < k; j += kWarp) sum += table[r[j]] * xr[j];
  } else {
    const int64_t bytes = (k + 1) / 2;
    const uint8_t* r = indices + row * bytes;
    for (int64_t b = lane; b < bytes; b += kWarp) {
      const uint8_t v = r[b];
      sum += table[v & 15] * xr[2 * b];
      if (2 * b + 1 < k) sum += table[v >> 4] * xr[2 * b + 1];
    }
  }
  sum = WarpSum(sum);
  if (lane == 0) y[batch * n + row] = sum + (bias ? bias[row] : 0.0f);
}

__device__ inline void Report(CsrProblem* problem, int kind, int64_t position, int64_t value) {
  // keep the earliest position of the most basic kind: kinds are ordered, positions compared after
  unsigned long long key = (static_cast<unsigned long long>(kind) << 56) | static_cast<unsigned long long>(position);
  unsigned long long* slot = reinterpret_cast<unsigned long long*>(&problem->position);
  const unsigned long long old = atomicMin(slot, key);
  if (key < old) problem->value = value;  // best effort: the host re-reads the value
}

template <typename Index>
__global__ void ValidateKernel(const int32_t* row_ptr, int64_t n, const Index* cols, int64_t nnz, int64_t k,
                               const uint8_t* indices, int64_t codebook_size, CsrProblem* problem) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (start == 0) {
    if (row_ptr[0] != 0) Report(problem, 1, 0, row_ptr[0]);
    if (row_ptr[n] != nnz) Report(problem, 3, n, row_ptr[n]);
  }
  for (int64_t r = start; r < n; r += stride) {
    if (row_ptr[r + 1] < row_ptr[r]) Report(problem, 2, r + 1, row_ptr[r + 1]);
  }
  for (int64_t j = start; j < nnz; j += stride) {
    const int64_t c = static_cast<int64_t>(cols[j]);
    if (c < 0 || c >= k) Report(problem, 4, j, c);
    if (indices && indices[j] >= codebook_size) Report(problem, 5, j, indices[j]);
  }
}

dim3 Grid(int64_t n, int64_t m) {
  return dim3(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock), static_cast<unsigned>(m));
}

}  // namespace

template <typename Index>
cudaError_t SparseMatMul(cudaStream_t stream, const float* x, int64_t m, int64_t k, int64_t n, const float* values,
                         const uint8_t* indices, const float* codebook, int64_t, const Index* cols,
                         const int32_t* row_ptr, const float* bias, float* y) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > 65535) return cudaErrorInvalidConfiguration;
  SparseMatMulKernel<Index><<<Grid(n, m), kWarp * kWarpsPerBlock, 0, stream>>>(x, m, k, n, values, indices, codebook,
                                                                                cols, row_ptr, bias, y);
  return cudaGetLastError();
}

cudaError_t CodebookMatMul(cudaStream_t stream, const float* x, int64_t m, int64_t k, int64_t n,
                           const uint8_t* indices, int bits, const float* codebook, int64_t codebook_size,
                           const float* bias, float* y) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > 65535) return cudaErrorInvalidConfiguration;
  CodebookMatMulKernel<<<Grid(n, m), kWarp * kWarpsPerBlock, 0, stream>>>(x, m, k, n, indices, bits, codebook,
                                                                          codebook_size, bias, y);
  return cudaGetLastError();
}

template <typename Index>
cudaError_t ValidateCsr(cudaStream_t stream, const int32_t* row_ptr, int64_t n, const Index* cols, int64_t nnz,
                        int64_t k, const uint8_t* indices, int64_t codebook_size, CsrProblem* problem) {
  CsrProblem* device = nullptr;
  cudaError_t status = cudaMallocAsync(&device, sizeof(CsrProblem), stream);
  if (status != cudaSuccess) return status;
  CsrProblem none{0, LLONG_MAX, 0};
  cudaMemcpyAsync(device, &none, sizeof(none), cudaMemcpyHostToDevice, stream);
  ValidateKernel<Index><<<256, 256, 0, stream>>>(row_ptr, n, cols, nnz, k, indices, codebook_size, device);
  status = cudaGetLastError();
  if (status == cudaSuccess) status = cudaMemcpyAsync(problem, device, sizeof(CsrProblem), cudaMemcpyDeviceToHost, stream);
  if (status == cudaSuccess) status = cudaStreamSynchronize(stream);
  cudaFreeAsync(device, stream);
  if (status != cudaSuccess) return status;
  const unsigned long long key = static_cast<unsigned long long>(problem->position);
  if (key == static_cast<unsigned long long>(LLONG_MAX)) {
    problem->kind = 0;
  } else {
    problem->kind = static_cast<int>(key >> 56);
    problem->position = static_cast<int64_t>(key & ((1ull << 56) - 1));
  }
  return cudaSuccess;
}

template cudaError_t SparseMatMul<int32_t>(cudaStream_t, const float*, int64_t, int64_t, int64_t, const float*,
                                           const uint8_t*, const float*, int64_t, const int32_t*, const int32_t*,
                                           const float*, float*);
template cudaError_t SparseMatMul<uint16_t>(cudaStream_t, const float*, int64_t, int64_t, int64_t, const float*,
                                            const uint8_t*, const float*, int64_t, const uint16_t*, const int32_t*,
                                            const float*, float*);
template cudaError_t ValidateCsr<int32_t>(cudaStream_t, const int32_t*, int64_t, const int32_t*, int64_t, int64_t,
                                          const uint8_t*, int64_t, CsrProblem*);
template cudaError_t ValidateCsr<uint16_t>(cudaStream_t, const int32_t*, int64_t, const uint16_t*, int64_t, int64_t,
                                           const uint8_t*, int64_t, CsrProblem*);

}  // namespace cuda
}  // namespace onnxcompress
