// SparseMatMul: Y = X . W (+ bias) with W held as CSR of its transpose (fp32 values).
//
// Layout (Han et al., "Deep Compression", ICLR 2016; the row-wise form of EIE): W is K x N as
// in ONNX MatMul. Its transpose W^T (N x K) is stored in CSR: output neuron n owns entries
// row_ptr[n] .. row_ptr[n+1]-1, each a value and the input column (int32 or uint16) it reads.
// Exact: the same products as dense MatMul, summed in a different order (fp32 rounding only).
//
// Paths:
//  * batch 1 (M == 1): per output row, a dot product whose x[col] operands are scalar loads
//    packed into AVX2 vectors (faster than AVX2 gathers on the machines measured). It streams
//    6 bytes per non-zero (uint16 columns) against 4 bytes per weight for dense MatMul.
//  * batched (M > 1): X is transposed once to X^T (K x Mp); every non-zero then does an AXPY of
//    a contiguous tile of up to 32 batch entries held in registers, prefetching ahead.
// Rows are split across onnxruntime's intra-op threads by equal non-zero counts.
#include "common.h"

#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <memory>

namespace onnxcompress {
namespace {

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// y = sum_j values[j] * x[cols[j]] for j in [begin, end).
// Eight scalar loads assembled into a vector beat AVX2 gathers here (5.5 vs 2.9 non-zeros per
// ns on one Zen 4 core, x in L1); four accumulators hide the FMA latency.
template <typename Index>
inline float SparseDot(const float* values, const Index* cols, int64_t begin, int64_t end, const float* x) {
#define ONNXCOMPRESS_GATHER8(o)                                                                      \
  _mm256_set_ps(x[cols[j + (o) + 7]], x[cols[j + (o) + 6]], x[cols[j + (o) + 5]], x[cols[j + (o) + 4]], \
                x[cols[j + (o) + 3]], x[cols[j + (o) + 2]], x[cols[j + (o) + 1]], x[cols[j + (o)]])
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps();
  __m256 acc3 = _mm256_setzero_ps();
  int64_t j = begin;
  for (; j + 32 <= end; j += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j), ONNXCOMPRESS_GATHER8(0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j + 8), ONNXCOMPRESS_GATHER8(8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j + 16), ONNXCOMPRESS_GATHER8(16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j + 24), ONNXCOMPRESS_GATHER8(24), acc3);
  }
  for (; j + 8 <= end; j += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + j), ONNXCOMPRESS_GATHER8(0), acc0);
  }
#undef ONNXCOMPRESS_GATHER8
  float sum = HorizontalSum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; j < end; ++j) sum += values[j] * x[static_cast<int64_t>(cols[j])];
  return sum;
}

// For rows [r0, r1): acc = sum_j values[j] * xt[cols[j], m0 : m0 + 8*T] (T vectors, U independent
// accumulator sets to hide FMA latency, software prefetch of the X^T row 16 non-zeros ahead);
// stores each row's tile contiguously into yt[(n - r0) * mp + m0 ...] (a per-task Y^T block).
template <int T, int U, typename Index>
void SparseRowsTile(const float* values, const Index* cols, const int32_t* row_ptr, int64_t r0, int64_t r1,
                    const float* xt, int64_t mp, int64_t m0, float* yt) {
  constexpr int kAhead = 16;
  for (int64_t n = r0; n < r1; ++n) {
    __m256 acc[U][T];
    for (int u = 0; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[u][t] = _mm256_setzero_ps();
    const int64_t end = row_ptr[n + 1];
    int64_t j = row_ptr[n];
    for (; j + U + kAhead <= end; j += U) {
      for (int u = 0; u < U; ++u) {
        const float* ahead = xt + static_cast<int64_t>(cols[j + u + kAhead]) * mp + m0;
        for (int t = 0; t < T; t += 2) _mm_prefetch(reinterpret_cast<const char*>(ahead + 8 * t), _MM_HINT_T0);
        const __m256 v = _mm256_broadcast_ss(values + j + u);
        const float* row = xt + static_cast<int64_t>(cols[j + u]) * mp + m0;
        for (int t = 0; t < T; ++t) acc[u][t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(row + 8 * t), acc[u][t]);
      }
    }
    for (; j < end; ++j) {
      const __m256 v = _mm256_broadcast_ss(values + j);
      const float* row = xt + static_cast<int64_t>(cols[j]) * mp + m0;
      for (int t = 0; t < T; ++t) acc[0][t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(row + 8 * t), acc[0][t]);
    }
    for (int u = 1; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[0][t] = _mm256_add_ps(acc[0][t], acc[u][t]);
    float* out = yt + (n - r0) * mp + m0;
    for (int t = 0; t < T; ++t) _mm256_storeu_ps(out + 8 * t, acc[0][t]);
  }
}

// The same with AVX-512 (T vectors of 16), used only where the CPU has it (runtime check):
// the library itself targets x86-64-v3.
template <int T, int U, typename Index>
__attribute__((target("avx512f"))) void SparseRowsTile512(const float* values, const Index* cols,
                                                           const int32_t* row_ptr, int64_t r0, int64_t r1,
                                                           const float* xt, int64_t mp, int64_t m0, float* yt) {
  constexpr int kAhead = 16;
  for (int64_t n = r0; n < r1; ++n) {
    __m512 acc[U][T];
    for (int u = 0; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[u][t] = _mm512_setzero_ps();
    const int64_t end = row_ptr[n + 1];
    int64_t j = row_ptr[n];
    for (; j + U + kAhead <= end; j += U) {
      for (int u = 0; u < U; ++u) {
        const float* ahead = xt + static_cast<int64_t>(cols[j + u + kAhead]) * mp + m0;
        for (int t = 0; t < T; ++t) _mm_prefetch(reinterpret_cast<const char*>(ahead + 16 * t), _MM_HINT_T0);
        const __m512 v = _mm512_set1_ps(values[j + u]);
        const float* row = xt + static_cast<int64_t>(cols[j + u]) * mp + m0;
        for (int t = 0; t < T; ++t) acc[u][t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 16 * t), acc[u][t]);
      }
    }
    for (; j < end; ++j) {
      const __m512 v = _mm512_set1_ps(values[j]);
      const float* row = xt + static_cast<int64_t>(cols[j]) * mp + m0;
      for (int t = 0; t < T; ++t) acc[0][t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 16 * t), acc[0][t]);
    }
    for (int u = 1; u < U; ++u)
      for (int t = 0; t < T; ++t) acc[0][t] = _mm512_add_ps(acc[0][t], acc[u][t]);
    float* out = yt + (n - r0) * mp + m0;
    for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + 16 * t, acc[0][t]);
  }
}

// ONNXCOMPRESS_KERNELS_ISA=avx2 forces the AVX2 paths (tests cover both on AVX-512 machines).
bool HasAvx512() {
  static const bool has = [] {
    const char* isa = std::getenv("ONNXCOMPRESS_KERNELS_ISA");
    return __builtin_cpu_supports("avx512f") && !(isa && std::string(isa) == "avx2");
  }();
  return has;
}

// Rows [r0, r1) for all m batch entries: batch tiles of 32 into a Y^T block, then a blocked
// transpose (plus bias) into y (M x n_out). mp is m rounded up to 16; xt is K x mp.
template <typename Index>
void SparseRows(const float* values, const Index* cols, const int32_t* row_ptr, int64_t r0, int64_t r1,
                const float* xt, int64_t m, int64_t mp, const float* bias, float* y, int64_t n_out) {
  constexpr int64_t kTile = 32;
  std::vector<float> yt(static_cast<size_t>((r1 - r0) * mp));
  const bool wide = HasAvx512();
  for (int64_t m0 = 0; m0 < m; m0 += kTile) {
    const int64_t width = std::min<int64_t>(kTile, m - m0);
    if (wide) {
      if (width > 16) SparseRowsTile512<2, 2>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data());
      else SparseRowsTile512<1, 4>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data());
      continue;
    }
    switch ((width + 7) / 8) {
      case 1: SparseRowsTile<1, 4>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data()); break;
      case 2: SparseRowsTile<2, 2>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data()); break;
      case 3: SparseRowsTile<3, 2>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data()); break;
      default: SparseRowsTile<4, 2>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data()); break;
    }
  }
  constexpr int64_t kBlock = 16;
  for (int64_t b0 = r0; b0 < r1; b0 += kBlock) {
    const int64_t b1 = std::min(r1, b0 + kBlock);
    for (int64_t i = 0; i < m; ++i) {
      float* dst = y + i * n_out;
      for (int64_t n = b0; n < b1; ++n) dst[n] = yt[(n - r0) * mp + i] + (bias ? bias[n] : 0.0f);
    }
  }
}

// X (M x K, row-major) -> X^T (K x Mp), zero padding columns M .. Mp-1.
void Transpose(const float* x, int64_t m, int64_t k, int64_t mp, float* xt) {
  constexpr int64_t kBlock = 64;
  for (int64_t k0 = 0; k0 < k; k0 += kBlock) {
    const int64_t k1 = std::min(k, k0 + kBlock);
    for (int64_t i = 0; i < m; ++i) {
      const float* src = x + i * k;
      for (int64_t c = k0; c < k1; ++c) xt[c * mp + i] = src[c];
    }
    for (int64_t c = k0; c < k1; ++c)
      for (int64_t i = m; i < mp; ++i) xt[c * mp + i] = 0.0f;
  }
}

template <typename Index>
struct SparseMatMulKernel {
  SparseMatMulKernel(const OrtApi*, const OrtKernelInfo* info) {
    k_ = ReadIntAttribute(info, "SparseMatMul", "K", error_);
    n_ = ReadIntAttribute(info, "SparseMatMul", "N", error_);
    if (error_.empty() && (k_ <= 0 || n_ <= 0)) {
      error_ = Message("SparseMatMul: attributes K = ", k_, " and N = ", n_, " must be positive");
    }
    cache_.SetConstant(IsConstantInput(info, 2) && IsConstantInput(info, 3));
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) { return InferMatMulShape(ctx).release(); }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<Index>& cols,
                      const Ort::Custom::Tensor<int32_t>& row_ptr,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    try {
      return Run(context, x, values, cols, row_ptr, bias, y);
    } catch (const Ort::Exception& e) {
      return Ort::Status(Message("SparseMatMul: ", e.what()).c_str(), e.GetOrtErrorCode());
    } catch (const std::exception& e) {
      return Ort::Status(Message("SparseMatMul: ", e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
    }
  }

 private:
  Ort::Status Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                  const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<Index>& cols,
                  const Ort::Custom::Tensor<int32_t>& row_ptr, std::optional<const Ort::Custom::Tensor<float>*> bias,
                  Ort::Custom::Tensor<float>& y) {
    if (!error_.empty()) return Error(error_);
    const std::vector<int64_t> x_shape = x.Shape();
    if (x_shape.empty() || x_shape.back() != k_) {
      return Error(Message("SparseMatMul: X has shape ", ShapeString(x_shape), ", its last dimension must be K = ", k_));
    }
    const std::vector<int64_t> v_shape = values.Shape(), c_shape = cols.Shape(), r_shape = row_ptr.Shape();
    if (v_shape.size() != 1 || c_shape.size() != 1 || r_shape.size() != 1) {
      return Error(Message("SparseMatMul: values ", ShapeString(v_shape), ", col_indices ", ShapeString(c_shape),
                           " and row_ptr ", ShapeString(r_shape), " must be 1-D"));
    }
    const int64_t nnz = c_shape[0];
    const int32_t* rp = row_ptr.Data();
    const Index* ci = cols.Data();
    const float* va = values.Data();
    if (!cache_.Valid(ci, rp)) {
      if (r_shape[0] != n_ + 1) {
        return Error(Message("SparseMatMul: row_ptr has ", r_shape[0], " entries, expected N + 1 = ", n_ + 1));
      }
      Ort::Status status = ValidateCsr("SparseMatMul", rp, r_shape[0], ci, nnz, v_shape[0], n_, k_);
      if (!status.IsOK()) return status;
      cache_.Remember(ci, rp);
    } else if (v_shape[0] != nnz) {
      return Error(Message("SparseMatMul: values has ", v_shape[0], " entries but col_indices has ", nnz));
    }
    const float* b = nullptr;
    if (bias.has_value() && *bias != nullptr) {
      const std::vector<int64_t> b_shape = (*bias)->Shape();
      if (NumElements(b_shape) != n_) {
        return Error(Message("SparseMatMul: bias has shape ", ShapeString(b_shape), ", expected [", n_, "]"));
      }
      b = (*bias)->Data();
    }
    float* out = y.Allocate(OutputShape(x_shape, n_));
    const int64_t m = NumElements(x_shape) / k_;
    if (m == 0) return Ort::Status{nullptr};
    const float* xd = x.Data();
    const size_t tasks = TaskCount(static_cast<double>(nnz) * static_cast<double>(m) + n_ * 8.0, n_);
    const std::vector<int64_t> splits = BalancedRowSplits(rp, n_, tasks);
    if (m == 1) {
      auto work = [&](size_t t) {
        for (int64_t n = splits[t]; n < splits[t + 1]; ++n) {
          out[n] = SparseDot(va, ci, rp[n], rp[n + 1], xd) + (b ? b[n] : 0.0f);
        }
      };
      ParallelFor(context, tasks, work);
      return Ort::Status{nullptr};
    }
    const int64_t mp = (m + 15) / 16 * 16;  // whole 16-wide vectors in every tile
    std::unique_ptr<float[]> xt(new float[static_cast<size_t>(k_ * mp)]);
    Transpose(xd, m, k_, mp, xt.get());
    auto work = [&](size_t t) {
      SparseRows(va, ci, rp, splits[t], splits[t + 1], xt.get(), m, mp, b, out, n_);
    };
    ParallelFor(context, tasks, work);
    return Ort::Status{nullptr};
  }

  int64_t k_ = 0;
  int64_t n_ = 0;
  std::string error_;
  ValidationCache cache_;
};

}  // namespace

Ort::Status InferMatMulShape(Ort::ShapeInferContext& ctx) {
  try {
    const int64_t n = ctx.GetAttrInt("N");
    Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
    if (shape.empty()) return Error("onnxcompress: X must have at least one dimension");
    shape.back() = Ort::ShapeInferContext::SymbolicInteger(n);
    return ctx.SetOutputShape(0, shape);
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), ORT_INVALID_ARGUMENT);
  }
}

void AddSparseMatMul(Ort::CustomOpDomain& domain) {
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op_int32{
      Ort::Custom::CreateLiteCustomOp<SparseMatMulKernel<int32_t>>("SparseMatMul", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op_uint16{
      Ort::Custom::CreateLiteCustomOp<SparseMatMulKernel<uint16_t>>("SparseMatMul", "CPUExecutionProvider")};
  domain.Add(op_int32.get());
  domain.Add(op_uint16.get());
}

}  // namespace onnxcompress
