// CodebookMatMul: Y = X . W (+ bias) for a dense weight-shared layer (Deep Compression's
// "trained quantization": every weight is one of C shared values).
//
// W (K x N) is stored as W^T's codebook indices, row by row (output neuron n owns row n):
//   bits = 8: uint8 [N, K], one index per byte;
//   bits = 4: uint8 [N, ceil(K/2)], index of column 2b in the low nibble of byte b, of 2b+1 in
//             the high nibble (a zero nibble pads odd K).
// and codebook float [C] (C <= 2^bits). Exact: W[k, n] = codebook[index], then the products of
// dense MatMul in another order.
//
// Batch 1 reads 0.5 (4-bit) or 1 byte per weight instead of 4: the 16-entry codebook sits in
// registers (AVX-512: one permute per 16 weights; AVX2: two permutes and a blend per 8) and x is
// split once into even and odd columns so both nibbles of a byte meet contiguous x. Larger
// batches decode blocks of 8 rows into fp32 and run a small register-blocked dot-product kernel.
#include "common.h"
#include "validate.h"

#include <immintrin.h>

#include <cstdlib>
#include <memory>

namespace onnxcompress {
namespace {

inline float Sum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

bool HasAvx512Codebook() {
  static const bool has = [] {
    const char* isa = std::getenv("ONNXCOMPRESS_KERNELS_ISA");
    return __builtin_cpu_supports("avx512f") && !(isa && std::string(isa) == "avx2");
  }();
  return has;
}

inline __m256 Lookup16(__m256 lo, __m256 hi, __m256i i) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, i);
  const __m256 b = _mm256_permutevar8x32_ps(hi, i);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))));
}

// 4-bit row dot product: sum_b cb[lo(byte b)] * xe[b] + cb[hi(byte b)] * xo[b], AVX2.
float Dot4(const uint8_t* row, int64_t bytes, const float* table, const float* xe, const float* xo) {
  const __m256 lo_half = _mm256_loadu_ps(table);
  const __m256 hi_half = _mm256_loadu_ps(table + 8);
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= bytes; b += 16) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b));
    const __m256i v0 = _mm256_cvtepu8_epi32(raw);
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    acc0 = _mm256_fmadd_ps(Lookup16(lo_half, hi_half, _mm256_and_si256(v0, mask)), _mm256_loadu_ps(xe + b), acc0);
    acc1 = _mm256_fmadd_ps(Lookup16(lo_half, hi_half, _mm256_srli_epi32(v0, 4)), _mm256_loadu_ps(xo + b), acc1);
    acc2 = _mm256_fmadd_ps(Lookup16(lo_half, hi_half, _mm256_and_si256(v1, mask)), _mm256_loadu_ps(xe + b + 8), acc2);
    acc3 = _mm256_fmadd_ps(Lookup16(lo_half, hi_half, _mm256_srli_epi32(v1, 4)), _mm256_loadu_ps(xo + b + 8), acc3);
  }
  float sum = Sum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; b < bytes; ++b) sum += table[row[b] & 15] * xe[b] + table[row[b] >> 4] * xo[b];
  return sum;
}

// The same with AVX-512: the whole 16-entry codebook in one register, one permute per 16 weights.
__attribute__((target("avx512f"))) float Dot4Avx512(const uint8_t* row, int64_t bytes, const float* table,
                                                     const float* xe, const float* xo) {
  const __m512 cb = _mm512_loadu_ps(table);
  const __m512i mask = _mm512_set1_epi32(15);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
         acc3 = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 32 <= bytes; b += 32) {
    const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b)));
    const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b + 16)));
    acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(v0, mask), cb), _mm512_loadu_ps(xe + b), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), cb), _mm512_loadu_ps(xo + b), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(v1, mask), cb), _mm512_loadu_ps(xe + b + 16), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), cb), _mm512_loadu_ps(xo + b + 16), acc3);
  }
  const __m512 total = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
  const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(total), 1));
  float sum = Sum8(_mm256_add_ps(_mm512_castps512_ps256(total), upper));
  for (; b < bytes; ++b) sum += table[row[b] & 15] * xe[b] + table[row[b] >> 4] * xo[b];
  return sum;
}

// 8-bit row dot product: weights by scalar codebook loads packed into vectors (or in-register
// permutes when the codebook has at most 16 entries).
float Dot8(const uint8_t* row, int64_t k, const float* table, bool small, const float* x) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  if (small) {
    const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    for (; j + 16 <= k; j += 16) {
      const __m256i i0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
      const __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j + 8)));
      acc0 = _mm256_fmadd_ps(Lookup16(lo, hi, i0), _mm256_loadu_ps(x + j), acc0);
      acc1 = _mm256_fmadd_ps(Lookup16(lo, hi, i1), _mm256_loadu_ps(x + j + 8), acc1);
    }
  } else {
    for (; j + 8 <= k; j += 8) {
      const __m256 w = _mm256_set_ps(table[row[j + 7]], table[row[j + 6]], table[row[j + 5]], table[row[j + 4]],
                                     table[row[j + 3]], table[row[j + 2]], table[row[j + 1]], table[row[j]]);
      acc0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j), acc0);
    }
  }
  float sum = Sum8(_mm256_add_ps(acc0, acc1));
  for (; j < k; ++j) sum += table[row[j]] * x[j];
  return sum;
}

// Decode row n of W^T into k floats.
void DecodeRow(const uint8_t* indices, int64_t n, int64_t k, int bits, const float* table, float* out) {
  if (bits == 8) {
    const uint8_t* row = indices + n * k;
    for (int64_t j = 0; j < k; ++j) out[j] = table[row[j]];
    return;
  }
  const int64_t bytes = (k + 1) / 2;
  const uint8_t* row = indices + n * bytes;
  for (int64_t b = 0; b < bytes; ++b) {
    out[2 * b] = table[row[b] & 15];
    if (2 * b + 1 < k) out[2 * b + 1] = table[row[b] >> 4];
  }
}

// Rows [r0, r1) for m > 1: decode 8 rows at a time into fp32, then per batch row 8 dot
// products sharing each load of x, over column blocks that keep the decoded block in L1.
void BatchedRows(const uint8_t* indices, int bits, const float* table, int64_t r0, int64_t r1, const float* x,
                 int64_t m, int64_t k, const float* bias, float* y, int64_t n_out) {
  constexpr int64_t kRows = 8;
  constexpr int64_t kCols = 512;
  std::vector<float> block(static_cast<size_t>(kRows * k));
  std::vector<float> partial(static_cast<size_t>(m * kRows));
  for (int64_t n0 = r0; n0 < r1; n0 += kRows) {
    const int64_t rows = std::min(kRows, r1 - n0);
    for (int64_t r = 0; r < rows; ++r) DecodeRow(indices, n0 + r, k, bits, table, block.data() + r * k);
    for (int64_t r = rows; r < kRows; ++r) std::fill(block.begin() + r * k, block.begin() + (r + 1) * k, 0.0f);
    std::fill(partial.begin(), partial.end(), 0.0f);
    for (int64_t c0 = 0; c0 < k; c0 += kCols) {
      const int64_t c1 = std::min(k, c0 + kCols);
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * k;
        __m256 acc[kRows];
        for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8) {
          const __m256 xv = _mm256_loadu_ps(xi + c);
          for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(block.data() + r * k + c), xv, acc[r]);
        }
        for (int64_t r = 0; r < kRows; ++r) {
          float s = Sum8(acc[r]);
          for (int64_t t = c; t < c1; ++t) s += block[r * k + t] * xi[t];
          partial[i * kRows + r] += s;
        }
      }
    }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < rows; ++r) y[i * n_out + n0 + r] = partial[i * kRows + r] + (bias ? bias[n0 + r] : 0.0f);
  }
}

struct CodebookMatMulKernel {
  static constexpr const char* kOp = "CodebookMatMul";

  CodebookMatMulKernel(const OrtApi*, const OrtKernelInfo* info) {
    error_ = ReadCodebookAttributes(info, kOp, k_, n_, bits_);
    cache_.SetConstant(IsConstantInput(info, 1) && IsConstantInput(info, 2));
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) { return InferMatMulShape(ctx).release(); }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<uint8_t>& indices, const Ort::Custom::Tensor<float>& codebook,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    return Guarded(kOp, [&]() -> Ort::Status { return Run(context, x, indices, codebook, bias, y); });
  }

 private:
  Ort::Status Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                  const Ort::Custom::Tensor<uint8_t>& indices, const Ort::Custom::Tensor<float>& codebook,
                  std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    if (!error_.empty()) return Error(error_);
    const std::vector<int64_t> x_shape = x.Shape();
    const std::vector<int64_t> cb_shape = codebook.Shape();
    Ort::Status checked = CheckX(kOp, x_shape, k_);
    if (checked.IsOK()) checked = CheckPackedIndices(kOp, indices.Shape(), k_, n_, bits_);
    if (checked.IsOK()) checked = CheckCodebook(kOp, cb_shape, int64_t{1} << bits_);
    if (!checked.IsOK()) return checked;
    const int64_t row_bytes = PackedRowBytes(k_, bits_);
    const int64_t size = cb_shape[0];
    const uint8_t* idx = indices.Data();
    if (!cache_.Valid(idx, codebook.Data(), nullptr, size)) {
      Ort::Status status = CheckIndices(idx, size);
      if (!status.IsOK()) return status;
      cache_.Remember(idx, codebook.Data(), nullptr, size);
    }
    const float* b = nullptr;
    Ort::Status status = ReadBias(kOp, bias, n_, &b);
    if (!status.IsOK()) return status;
    alignas(64) float table[256] = {};
    std::copy(codebook.Data(), codebook.Data() + size, table);  // zero padding: every index is safe
    float* out = y.Allocate(OutputShape(x_shape, n_));
    const int64_t m = NumElements(x_shape) / k_;
    if (m == 0) return Ort::Status{nullptr};
    const float* xd = x.Data();
    const size_t tasks = TaskCount(static_cast<double>(k_) * static_cast<double>(n_) * static_cast<double>(m) / 4.0, n_);
    const int64_t per_task = (n_ + static_cast<int64_t>(tasks) - 1) / static_cast<int64_t>(tasks);
    if (m == 1) {
      std::vector<float> xe, xo;
      if (bits_ == 4) {
        xe.assign(static_cast<size_t>(row_bytes), 0.0f);
        xo.assign(static_cast<size_t>(row_bytes), 0.0f);
        for (int64_t j = 0; j < k_; ++j) (j % 2 ? xo : xe)[static_cast<size_t>(j / 2)] = xd[j];
      }
      const bool wide = HasAvx512Codebook();
      auto work = [&](size_t t) {
        const int64_t r1 = std::min(n_, (static_cast<int64_t>(t) + 1) * per_task);
        for (int64_t r = static_cast<int64_t>(t) * per_task; r < r1; ++r) {
          const uint8_t* row = idx + r * row_bytes;
          float s;
          if (bits_ == 4) s = wide ? Dot4Avx512(row, row_bytes, table, xe.data(), xo.data())
                                   : Dot4(row, row_bytes, table, xe.data(), xo.data());
          else s = Dot8(row, k_, table, size <= 16, xd);
          out[r] = s + (b ? b[r] : 0.0f);
        }
      };
      ParallelFor(context, tasks, work);
      return Ort::Status{nullptr};
    }
    auto work = [&](size_t t) {
      const int64_t r0 = static_cast<int64_t>(t) * per_task;
      const int64_t r1 = std::min(n_, r0 + per_task);
      if (r0 < r1) BatchedRows(idx, static_cast<int>(bits_), table, r0, r1, xd, m, k_, b, out, n_);
    };
    ParallelFor(context, tasks, work);
    return Ort::Status{nullptr};
  }

  // Every index (both nibbles for 4 bits, the padding nibble included) must be < C.
  Ort::Status CheckIndices(const uint8_t* idx, int64_t size) const {
    const int64_t row_bytes = PackedRowBytes(k_, bits_);
    for (int64_t r = 0; r < n_; ++r) {
      for (int64_t j = 0; j < row_bytes; ++j) {
        const int v = idx[r * row_bytes + j];
        const int first = bits_ == 8 ? v : (v & 15);
        const int second = bits_ == 8 ? 0 : (v >> 4);
        if (first >= size || second >= size) {
          const int64_t column = bits_ == 8 ? j : 2 * j + (first >= size ? 0 : 1);
          return Error(Message(kOp, ": index of W[", column, ", ", r, "] = ", first >= size ? first : second,
                               " is out of range for a codebook of ", size, " entries"));
        }
      }
    }
    return Ort::Status{nullptr};
  }

  int64_t k_ = 0;
  int64_t n_ = 0;
  int64_t bits_ = 8;
  std::string error_;
  ValidationCache cache_;
};

}  // namespace

void AddCodebookMatMul(Ort::CustomOpDomain& domain) {
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
      Ort::Custom::CreateLiteCustomOp<CodebookMatMulKernel>("CodebookMatMul", "CPUExecutionProvider")};
  domain.Add(op.get());
}

}  // namespace onnxcompress
