// The CSR family: SparseMatMul (fp32 values) and SparseCodebookMatMul (uint8 codebook indices as
// values, the EIE layout), Y = X . W (+ bias) with W held as CSR of its transpose.
//
// Layout (Han et al., "Deep Compression", ICLR 2016; Han et al., "EIE", ISCA 2016): W is K x N as
// in ONNX MatMul. Its transpose W^T (N x K) is stored in CSR: output neuron n owns entries
// row_ptr[n] .. row_ptr[n+1]-1, each a value (or a codebook index) and the input column (int32 or
// uint16) it reads. Exact: the same products as dense MatMul, summed in a different order.
//
// Paths:
//  * batch 1 (M == 1): per output row, a dot product whose x[col] operands are scalar loads
//    packed into AVX2 vectors (faster than AVX2 gathers on the machines measured). It streams
//    6 bytes per non-zero (fp32 + uint16 column; 3 with a codebook) against 4 per dense weight.
//  * batched (M > 1): X is transposed once to X^T (K x Mp); every non-zero then does an AXPY of
//    a contiguous tile of up to 64 batch entries (AVX-512, chosen at run time; 32 with AVX2)
//    held in registers, prefetching ahead, into a per-task Y^T block.
// Rows are split across onnxruntime's intra-op threads by equal non-zero counts.
#include "common.h"
#include "validate.h"

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

// ---- how a non-zero's value is read ---------------------------------------------------------

// fp32 values stored directly.
struct DirectValues {
  const float* v;
  float At(int64_t j) const { return v[j]; }
  __m256 Load8(int64_t j) const { return _mm256_loadu_ps(v + j); }
};

// uint8 indices into a codebook of at most 16 entries: two in-register permutes and a blend.
struct SmallCodebookValues {
  const uint8_t* idx;
  const float* cb;
  __m256 lo;
  __m256 hi;
  SmallCodebookValues(const uint8_t* indices, const float* codebook, int64_t size) : idx(indices), cb(codebook) {
    alignas(32) float table[16] = {};
    for (int64_t i = 0; i < size && i < 16; ++i) table[i] = codebook[i];
    lo = _mm256_load_ps(table);
    hi = _mm256_load_ps(table + 8);
  }
  float At(int64_t j) const { return cb[idx[j]]; }
  __m256 Load8(int64_t j) const {
    const __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx + j)));
    const __m256 a = _mm256_permutevar8x32_ps(lo, i);
    const __m256 b = _mm256_permutevar8x32_ps(hi, i);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))));
  }
};

// uint8 indices into a codebook of up to 256 entries (L1 resident): scalar loads.
struct CodebookValues {
  const uint8_t* idx;
  const float* cb;
  float At(int64_t j) const { return cb[idx[j]]; }
  __m256 Load8(int64_t j) const {
    return _mm256_set_ps(cb[idx[j + 7]], cb[idx[j + 6]], cb[idx[j + 5]], cb[idx[j + 4]], cb[idx[j + 3]],
                         cb[idx[j + 2]], cb[idx[j + 1]], cb[idx[j]]);
  }
};

// x[cols[0..7]] as a vector. Eight scalar loads assembled into a vector beat AVX2 gathers here
// (5.4 vs 2.9 non-zeros per ns on one core of the 2-core AMD EPYC test machine, x in L1). uint16 columns come in two 64-bit loads split with shifts, which
// leaves the load ports to the x operands (8% faster than eight 16-bit loads).
inline __m256 Gather8(const float* x, const uint16_t* cols) {
  uint64_t lo, hi;
  std::memcpy(&lo, cols, sizeof(lo));
  std::memcpy(&hi, cols + 4, sizeof(hi));
  return _mm256_set_ps(x[hi >> 48], x[(hi >> 32) & 0xffff], x[(hi >> 16) & 0xffff], x[hi & 0xffff], x[lo >> 48],
                       x[(lo >> 32) & 0xffff], x[(lo >> 16) & 0xffff], x[lo & 0xffff]);
}

inline __m256 Gather8(const float* x, const int32_t* cols) {
  return _mm256_set_ps(x[cols[7]], x[cols[6]], x[cols[5]], x[cols[4]], x[cols[3]], x[cols[2]], x[cols[1]], x[cols[0]]);
}

// y = sum_j values[j] * x[cols[j]] for j in [begin, end); four accumulators hide FMA latency.
template <typename Values, typename Index>
inline float SparseDot(const Values& values, const Index* cols, int64_t begin, int64_t end, const float* x) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps();
  __m256 acc3 = _mm256_setzero_ps();
  int64_t j = begin;
  for (; j + 32 <= end; j += 32) {
    acc0 = _mm256_fmadd_ps(values.Load8(j), Gather8(x, cols + j), acc0);
    acc1 = _mm256_fmadd_ps(values.Load8(j + 8), Gather8(x, cols + j + 8), acc1);
    acc2 = _mm256_fmadd_ps(values.Load8(j + 16), Gather8(x, cols + j + 16), acc2);
    acc3 = _mm256_fmadd_ps(values.Load8(j + 24), Gather8(x, cols + j + 24), acc3);
  }
  for (; j + 8 <= end; j += 8) {
    acc0 = _mm256_fmadd_ps(values.Load8(j), Gather8(x, cols + j), acc0);
  }
  float sum = HorizontalSum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; j < end; ++j) sum += values.At(j) * x[static_cast<int64_t>(cols[j])];
  return sum;
}

// For rows [r0, r1): acc = sum_j values[j] * xt[cols[j], m0 : m0 + 8*T] (T vectors, U independent
// accumulator sets to hide FMA latency, software prefetch of the X^T row 16 non-zeros ahead);
// stores each row's tile contiguously into yt[(n - r0) * mp + m0 ...] (a per-task Y^T block).
template <int T, int U, typename Values, typename Index>
void SparseRowsTile(const Values& values, const Index* cols, const int32_t* row_ptr, int64_t r0, int64_t r1,
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
        const __m256 v = _mm256_set1_ps(values.At(j + u));
        const float* row = xt + static_cast<int64_t>(cols[j + u]) * mp + m0;
        for (int t = 0; t < T; ++t) acc[u][t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(row + 8 * t), acc[u][t]);
      }
    }
    for (; j < end; ++j) {
      const __m256 v = _mm256_set1_ps(values.At(j));
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
template <int T, int U, typename Values, typename Index>
__attribute__((target("avx512f"))) void SparseRowsTile512(const Values& values, const Index* cols,
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
        const __m512 v = _mm512_set1_ps(values.At(j + u));
        const float* row = xt + static_cast<int64_t>(cols[j + u]) * mp + m0;
        for (int t = 0; t < T; ++t) acc[u][t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + 16 * t), acc[u][t]);
      }
    }
    for (; j < end; ++j) {
      const __m512 v = _mm512_set1_ps(values.At(j));
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
template <typename Values, typename Index>
void SparseRows(const Values& values, const Index* cols, const int32_t* row_ptr, int64_t r0, int64_t r1,
                const float* xt, int64_t m, int64_t mp, const float* bias, float* y, int64_t n_out) {
  std::vector<float> yt(static_cast<size_t>((r1 - r0) * mp));
  const bool wide = HasAvx512();
  // AVX-512: one pass over 64 batch entries (a 256-byte X^T row per non-zero) beat two passes of 32
  // by 1.0-1.4x at batch 64 on the test machine; the per-non-zero work is latency, not FMAs.
  const int64_t tile = wide ? 64 : 32;
  for (int64_t m0 = 0; m0 < m; m0 += tile) {
    const int64_t width = std::min<int64_t>(tile, m - m0);
    if (wide) {
      if (width > 48) SparseRowsTile512<4, 1>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data());
      else if (width > 32) SparseRowsTile512<3, 2>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data());
      else if (width > 16) SparseRowsTile512<2, 2>(values, cols, row_ptr, r0, r1, xt, mp, m0, yt.data());
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

// ---- shared run-time part of both ops --------------------------------------------------------

struct CsrArgs {
  const char* op;
  int64_t k;
  int64_t n;
};

// Computes Y once the inputs are checked.
template <typename Values, typename Index>
Ort::Status RunCsr(OrtKernelContext* context, const CsrArgs& args, const Ort::Custom::Tensor<float>& x,
                   const Values& values, const Index* cols, const int32_t* row_ptr, const float* bias,
                   Ort::Custom::Tensor<float>& y) {
  const std::vector<int64_t> x_shape = x.Shape();
  float* out = y.Allocate(OutputShape(x_shape, args.n));
  const int64_t m = NumElements(x_shape) / args.k;
  if (m == 0) return Ort::Status{nullptr};
  const float* xd = x.Data();
  const int64_t nnz = row_ptr[args.n];
  const size_t tasks = TaskCount(static_cast<double>(nnz) * static_cast<double>(m) + args.n * 8.0, args.n);
  const std::vector<int64_t> splits = BalancedRowSplits(row_ptr, args.n, tasks);
  if (m == 1) {
    auto work = [&](size_t t) {
      for (int64_t r = splits[t]; r < splits[t + 1]; ++r) {
        out[r] = SparseDot(values, cols, row_ptr[r], row_ptr[r + 1], xd) + (bias ? bias[r] : 0.0f);
      }
    };
    ParallelFor(context, tasks, work);
    return Ort::Status{nullptr};
  }
  // Batch rows in chunks, so that X^T stays cache-sized and memory bounded for any M.
  constexpr int64_t kChunk = 256;
  const int64_t chunk = std::min(m, kChunk);
  const int64_t mp_max = (chunk + 15) / 16 * 16;  // whole 16-wide vectors in every tile
  std::unique_ptr<float[]> xt(new float[static_cast<size_t>(args.k * mp_max)]);
  for (int64_t m0 = 0; m0 < m; m0 += chunk) {
    const int64_t rows = std::min(chunk, m - m0);
    const int64_t mp = (rows + 15) / 16 * 16;
    Transpose(xd + m0 * args.k, rows, args.k, mp, xt.get());
    float* y_chunk = out + m0 * args.n;
    auto work = [&](size_t t) {
      SparseRows(values, cols, row_ptr, splits[t], splits[t + 1], xt.get(), rows, mp, bias, y_chunk, args.n);
    };
    ParallelFor(context, tasks, work);
  }
  return Ort::Status{nullptr};
}

// Shape checks shared by both ops; validates the structure unless the cache vouches for it.
template <typename Index>
Ort::Status CheckCsrInputs(const CsrArgs& args, const std::vector<int64_t>& x_shape,
                           const std::vector<int64_t>& v_shape, const std::vector<int64_t>& c_shape,
                           const std::vector<int64_t>& r_shape, const Index* cols, const int32_t* row_ptr,
                           bool cached) {
  Ort::Status status = CheckX(args.op, x_shape, args.k);
  if (status.IsOK()) status = CheckCsrShapes(args.op, v_shape, c_shape, r_shape, args.n);
  if (!status.IsOK() || cached) return status;
  return ValidateCsr(args.op, row_ptr, r_shape[0], cols, c_shape[0], v_shape[0], args.n, args.k);
}

// ---- SparseMatMul(X, values, col_indices, row_ptr[, bias]) -> Y ------------------------------

template <typename Index>
struct SparseMatMulKernel {
  static constexpr const char* kOp = "SparseMatMul";

  SparseMatMulKernel(const OrtApi*, const OrtKernelInfo* info) {
    error_ = ReadSizes(info, kOp, k_, n_);
    cache_.SetConstant(IsConstantInput(info, 1) && IsConstantInput(info, 2) && IsConstantInput(info, 3));
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) { return InferMatMulShape(ctx).release(); }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<Index>& cols,
                      const Ort::Custom::Tensor<int32_t>& row_ptr,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    return Guarded(kOp, [&]() -> Ort::Status {
      if (!error_.empty()) return Error(error_);
      const CsrArgs args{kOp, k_, n_};
      const Index* ci = cols.Data();
      const int32_t* rp = row_ptr.Data();
      const bool cached = cache_.Valid(ci, rp, values.Data());
      Ort::Status status =
          CheckCsrInputs(args, x.Shape(), values.Shape(), cols.Shape(), row_ptr.Shape(), ci, rp, cached);
      if (!status.IsOK()) return status;
      cache_.Remember(ci, rp, values.Data());
      const float* b = nullptr;
      status = ReadBias(kOp, bias, n_, &b);
      if (!status.IsOK()) return status;
      return RunCsr(context, args, x, DirectValues{values.Data()}, ci, rp, b, y);
    });
  }

 private:
  int64_t k_ = 0;
  int64_t n_ = 0;
  std::string error_;
  ValidationCache cache_;
};

// ---- SparseCodebookMatMul(X, indices, col_indices, row_ptr, codebook[, bias]) -> Y ------------

template <typename Index>
struct SparseCodebookMatMulKernel {
  static constexpr const char* kOp = "SparseCodebookMatMul";

  SparseCodebookMatMulKernel(const OrtApi*, const OrtKernelInfo* info) {
    error_ = ReadSizes(info, kOp, k_, n_);
    cache_.SetConstant(IsConstantInput(info, 1) && IsConstantInput(info, 2) && IsConstantInput(info, 3) &&
                       IsConstantInput(info, 4));
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) { return InferMatMulShape(ctx).release(); }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<uint8_t>& indices, const Ort::Custom::Tensor<Index>& cols,
                      const Ort::Custom::Tensor<int32_t>& row_ptr, const Ort::Custom::Tensor<float>& codebook,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    return Guarded(kOp, [&]() -> Ort::Status {
      if (!error_.empty()) return Error(error_);
      const CsrArgs args{kOp, k_, n_};
      const std::vector<int64_t> cb_shape = codebook.Shape();
      Ort::Status checked = CheckCodebook(kOp, cb_shape, 256);
      if (!checked.IsOK()) return checked;
      const int64_t size = cb_shape[0];
      const Index* ci = cols.Data();
      const int32_t* rp = row_ptr.Data();
      const uint8_t* idx = indices.Data();
      const bool cached = cache_.Valid(ci, rp, idx, size);
      Ort::Status status =
          CheckCsrInputs(args, x.Shape(), indices.Shape(), cols.Shape(), row_ptr.Shape(), ci, rp, cached);
      if (!status.IsOK()) return status;
      if (!cached) {
        status = CheckCodebookIndices(kOp, idx, indices.Shape()[0], size);
        if (!status.IsOK()) return status;
        cache_.Remember(ci, rp, idx, size);
      }
      const float* b = nullptr;
      status = ReadBias(kOp, bias, n_, &b);
      if (!status.IsOK()) return status;
      if (size <= 16) return RunCsr(context, args, x, SmallCodebookValues(idx, codebook.Data(), size), ci, rp, b, y);
      return RunCsr(context, args, x, CodebookValues{idx, codebook.Data()}, ci, rp, b, y);
    });
  }

 private:
  int64_t k_ = 0;
  int64_t n_ = 0;
  std::string error_;
  ValidationCache cache_;
};

}  // namespace

Ort::Status ReadBias(const char* op, std::optional<const Ort::Custom::Tensor<float>*> bias, int64_t n,
                     const float** data) {
  *data = nullptr;
  if (!bias.has_value() || *bias == nullptr) return Ort::Status{nullptr};
  const std::vector<int64_t> shape = (*bias)->Shape();
  if (NumElements(shape) != n) {
    return Error(Message(op, ": bias has shape ", ShapeString(shape), ", expected [", n, "]"));
  }
  *data = (*bias)->Data();
  return Ort::Status{nullptr};
}

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

void AddSparseOps(Ort::CustomOpDomain& domain) {
  using Ort::Custom::CreateLiteCustomOp;
  using Ort::Custom::OrtLiteCustomOp;
  static std::unique_ptr<OrtLiteCustomOp> ops[] = {
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<SparseMatMulKernel<int32_t>>("SparseMatMul", "CPUExecutionProvider")},
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<SparseMatMulKernel<uint16_t>>("SparseMatMul", "CPUExecutionProvider")},
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<SparseCodebookMatMulKernel<int32_t>>("SparseCodebookMatMul", "CPUExecutionProvider")},
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<SparseCodebookMatMulKernel<uint16_t>>("SparseCodebookMatMul", "CPUExecutionProvider")},
  };
  for (auto& op : ops) domain.Add(op.get());
}

}  // namespace onnxcompress
