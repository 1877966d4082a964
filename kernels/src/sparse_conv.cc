// SparseConv: a pruned 1-D or 2-D Conv, Y = conv(X, W) (+ bias), with W held in CSR.
//
// Layout: W is ONNX's [M, C/group, kh, kw] (or [M, C/group, k]); row m of the CSR is filter m
// flattened, column (c * kh + i) * kw + j for channel c of its group and tap (i, j): the CSR of
// W.reshape(M, -1). Exact: the products of dense Conv, summed in another order.
//
// Every output row m (one output channel over all positions) is a sparse combination of shifted
// rows of one lowered input B: Y'[m, q] = bias[m] + sum_j values[j] * B[offset(col_j) + q], a
// sparse x dense product (Liu et al., "Sparse Convolutional Neural Networks", CVPR 2015) computed
// as direct sparse convolution (Park et al., "Faster CNNs with Direct Sparse Convolutions", ICLR
// 2017): B is X zero-padded to Hp x Wp and split into its stride phases, one Hq x Wq plane per
// (row phase, column phase) a tap reads (Hq = ceil(Hp / sh), Wq = ceil(Wp / sw)); tap (i, j) of
// channel c reads plane (c, i*dh % sh, j*dw % sw) from row i*dh / sh, column j*dw / sw on, so every
// non-zero is one contiguous AXPY over q = oh*Wq + ow in [0, OH*Wq); the Wq - OW columns per row
// that wrap around are computed, then dropped. Stride 1 without padding and 1-wide kernel rows
// (1x1 convolutions) read X in place; otherwise B costs one copy of X, never a k*k-fold im2col.
// Each non-zero does an AXPY over a 64-wide tile of positions held in eight AVX2 accumulators;
// the tile loop runs outside the row loop, so B's tile stays in cache across rows. Rows are split
// across onnxruntime's intra-op threads by equal non-zero counts.
#include "common.h"
#include "validate.h"

#include <immintrin.h>

#include <cstring>
#include <limits>
#include <memory>

namespace onnxcompress {
namespace {

constexpr const char* kOp = "SparseConv";
constexpr int kVectors = 8;              // accumulators per tile
constexpr int64_t kTile = 8 * kVectors;  // positions per tile

// The geometry of one call, as 2-D (a 1-D Conv is a 2-D one of height 1).
struct ConvShape {
  int64_t batch = 0, channels = 0, height = 1, width = 0;  // X
  int64_t filters = 0, group_channels = 0, kh = 1, kw = 1;  // W
  int64_t group = 1, sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t out_h = 0, out_w = 0;

  int64_t Columns() const { return group_channels * kh * kw; }
  int64_t Positions() const { return out_h * out_w; }
};

// The input of one image as the kernel reads it (see the file comment).
struct Lowered {
  std::unique_ptr<float[]> storage;   // null when B is X itself
  const float* data = nullptr;
  int64_t group_stride = 0;           // B of group g starts at data + g * group_stride
  int64_t row_length = 0;             // positions per output row in B's layout (Wp or OW)
  int64_t positions = 0;              // q range computed per output channel
  std::vector<int32_t> offsets;       // per CSR column
};

// y[q0, q0 + width) of one output row: bias + sum_j values[j] * b[offsets[cols[j]] + q].
// A full tile is kVectors vectors; a partial one ends in a masked vector (no read past the row).
template <typename Index>
void RowTile(const float* values, const Index* cols, int64_t begin, int64_t end, const int32_t* offsets,
             const float* b, int64_t q0, int64_t width, float bias, float* y) {
  __m256 acc[kVectors];
  for (int t = 0; t < kVectors; ++t) acc[t] = _mm256_set1_ps(bias);  // each vector is its own positions
  if (width == kTile) {
    constexpr int64_t kAhead = 8;
    for (int64_t j = begin; j < end; ++j) {
      if (j + kAhead < end) {
        const float* ahead = b + offsets[cols[j + kAhead]] + q0;
        _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ahead + 16), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ahead + 32), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ahead + 48), _MM_HINT_T0);
      }
      const __m256 v = _mm256_set1_ps(values[j]);
      const float* src = b + offsets[cols[j]] + q0;
      for (int t = 0; t < kVectors; ++t) acc[t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(src + 8 * t), acc[t]);
    }
    for (int t = 0; t < kVectors; ++t) _mm256_storeu_ps(y + q0 + 8 * t, acc[t]);
    return;
  }
  const int full = static_cast<int>(width / 8);
  const int rest = static_cast<int>(width % 8);
  static constexpr int32_t kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + 8 - rest));
  __m256 tail = _mm256_set1_ps(bias);
  for (int64_t j = begin; j < end; ++j) {
    const __m256 v = _mm256_set1_ps(values[j]);
    const float* src = b + offsets[cols[j]] + q0;
    for (int t = 0; t < full; ++t) acc[t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(src + 8 * t), acc[t]);
    if (rest) tail = _mm256_fmadd_ps(v, _mm256_maskload_ps(src + 8 * full, mask), tail);
  }
  for (int t = 0; t < full; ++t) _mm256_storeu_ps(y + q0 + 8 * t, acc[t]);
  if (rest) _mm256_maskstore_ps(y + q0 + 8 * full, mask, tail);
}

// Output rows [r0, r1) of one image into y (row m at y + m * row_stride).
template <typename Index>
void ComputeRows(const float* values, const Index* cols, const int32_t* row_ptr, int64_t r0, int64_t r1,
                 const Lowered& b, int64_t group_rows, const float* bias, float* y, int64_t row_stride) {
  for (int64_t q0 = 0; q0 < b.positions; q0 += kTile) {
    const int64_t width = std::min(kTile, b.positions - q0);
    for (int64_t m = r0; m < r1; ++m) {
      const float* base = b.data + (m / group_rows) * b.group_stride;
      RowTile(values, cols, row_ptr[m], row_ptr[m + 1], b.offsets.data(), base, q0, width, bias ? bias[m] : 0.0f,
              y + m * row_stride);
    }
  }
}

// Copy rows [r0, r1) of the computed Y' (OH x Wp per row) into y (OH x OW per row).
void DropWrappedColumns(const float* wide, int64_t r0, int64_t r1, const ConvShape& s, int64_t row_length,
                        float* y) {
  const int64_t wide_rows = s.out_h * row_length;
  for (int64_t m = r0; m < r1; ++m) {
    for (int64_t oh = 0; oh < s.out_h; ++oh) {
      std::memcpy(y + m * s.Positions() + oh * s.out_w, wide + m * wide_rows + oh * row_length,
                  static_cast<size_t>(s.out_w) * sizeof(float));
    }
  }
}

// Split [0, count) into about `tasks` ranges and run fn(begin, end) on each.
template <typename Fn>
void ParallelRanges(OrtKernelContext* context, int64_t count, size_t tasks, Fn&& fn) {
  tasks = std::max<size_t>(1, std::min<size_t>(tasks, static_cast<size_t>(std::max<int64_t>(count, 1))));
  auto work = [&](size_t t) {
    const int64_t begin = count * static_cast<int64_t>(t) / static_cast<int64_t>(tasks);
    const int64_t end = count * static_cast<int64_t>(t + 1) / static_cast<int64_t>(tasks);
    fn(begin, end);
  };
  ParallelFor(context, tasks, work);
}

// The stride phases (a, b) some kernel tap reads: input row oh*sh + i*dh lies in phase
// (i*dh) % sh at row oh + (i*dh) / sh of that phase's plane.
std::vector<int64_t> UsedPhases(int64_t taps, int64_t dilation, int64_t stride, std::vector<int64_t>& slot) {
  slot.assign(static_cast<size_t>(stride), -1);
  std::vector<int64_t> used;
  for (int64_t i = 0; i < taps; ++i) {
    const int64_t phase = (i * dilation) % stride;
    if (slot[static_cast<size_t>(phase)] < 0) {
      slot[static_cast<size_t>(phase)] = 0;
      used.push_back(phase);
    }
  }
  std::sort(used.begin(), used.end());
  for (size_t k = 0; k < used.size(); ++k) slot[static_cast<size_t>(used[k])] = static_cast<int64_t>(k);
  return used;
}

// Geometry of B: per channel, one Hq x Wq plane per used stride phase of zero-padded X.
struct PhaseLayout {
  int64_t hq = 0, wq = 0, plane = 0, planes_per_channel = 0, slack = 0;
  std::vector<int64_t> rows_used, cols_used, row_slot, col_slot;

  explicit PhaseLayout(const ConvShape& s) {
    const int64_t hp = s.height + s.pad_top + s.pad_bottom, wp = s.width + s.pad_left + s.pad_right;
    hq = (hp + s.sh - 1) / s.sh;
    wq = (wp + s.sw - 1) / s.sw;
    plane = hq * wq;
    rows_used = UsedPhases(s.kh, s.dh, s.sh, row_slot);
    cols_used = UsedPhases(s.kw, s.dw, s.sw, col_slot);
    planes_per_channel = static_cast<int64_t>(rows_used.size() * cols_used.size());
    slack = (s.kw - 1) * s.dw + 1;  // the last plane's wrapped columns read this far past it
  }
  int64_t Size(const ConvShape& s) const { return s.channels * planes_per_channel * plane + slack; }
};

// Copy X's phases into B, zero-padded; plane (c, a, b)[h', w'] = Xpad[c][h'*sh + a][w'*sw + b].
void CopyPhases(const float* x, const ConvShape& s, const PhaseLayout& layout, int64_t c, float* dst) {
  for (size_t ra = 0; ra < layout.rows_used.size(); ++ra) {
    for (size_t cb = 0; cb < layout.cols_used.size(); ++cb) {
      float* out = dst + static_cast<int64_t>(ra * layout.cols_used.size() + cb) * layout.plane;
      std::memset(out, 0, static_cast<size_t>(layout.plane) * sizeof(float));
      const int64_t a = layout.rows_used[ra], b = layout.cols_used[cb];
      for (int64_t hr = 0; hr < layout.hq; ++hr) {
        const int64_t h = hr * s.sh + a - s.pad_top;
        if (h < 0 || h >= s.height) continue;
        const float* line = x + (c * s.height + h) * s.width;
        float* row = out + hr * layout.wq;
        if (s.sw == 1) {
          const int64_t w0 = std::max<int64_t>(0, s.pad_left - b);
          const int64_t w1 = std::min<int64_t>(layout.wq, s.width + s.pad_left - b);
          if (w1 > w0) std::memcpy(row + w0, line + w0 + b - s.pad_left, static_cast<size_t>(w1 - w0) * sizeof(float));
          continue;
        }
        for (int64_t wr = 0; wr < layout.wq; ++wr) {
          const int64_t w = wr * s.sw + b - s.pad_left;
          if (w >= 0 && w < s.width) row[wr] = line[w];
        }
      }
    }
  }
}

// B for one image: X itself (stride 1, no padding, 1-wide kernel rows) or its phase planes.
void Lower(OrtKernelContext* context, const float* x, const ConvShape& s, Lowered& b) {
  const PhaseLayout layout(s);
  const bool in_place = s.sh == 1 && s.sw == 1 && s.pad_top == 0 && s.pad_left == 0 && s.pad_bottom == 0 &&
                        s.pad_right == 0 && (s.kw - 1) * s.dw == 0;
  const int64_t channel_stride = layout.planes_per_channel * layout.plane;
  if (in_place) {
    b.data = x;
  } else {
    b.storage.reset(new float[static_cast<size_t>(layout.Size(s))]);
    float* phases = b.storage.get();
    std::memset(phases + s.channels * channel_stride, 0, static_cast<size_t>(layout.slack) * sizeof(float));
    const size_t tasks = static_cast<size_t>(s.channels * channel_stride / 65536 + 1);
    ParallelRanges(context, s.channels, tasks, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) CopyPhases(x, s, layout, c, phases + c * channel_stride);
    });
    b.data = phases;
  }
  b.group_stride = s.group_channels * channel_stride;
  b.row_length = layout.wq;
  b.positions = s.out_h * layout.wq;
  b.offsets.resize(static_cast<size_t>(s.Columns()));
  for (int64_t c = 0; c < s.group_channels; ++c) {
    for (int64_t i = 0; i < s.kh; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t a = layout.row_slot[static_cast<size_t>((i * s.dh) % s.sh)];
        const int64_t p = layout.col_slot[static_cast<size_t>((j * s.dw) % s.sw)];
        const int64_t plane = c * layout.planes_per_channel + a * static_cast<int64_t>(layout.cols_used.size()) + p;
        b.offsets[static_cast<size_t>((c * s.kh + i) * s.kw + j)] = static_cast<int32_t>(
            plane * layout.plane + (i * s.dh / s.sh) * layout.wq + (j * s.dw) / s.sw);
      }
    }
  }
}

// The conv attributes, read once; `error` is set when one is missing or invalid.
struct SparseConvAttributes {
  std::vector<int64_t> weight_shape, strides, pads, dilations;
  int64_t group = 1;
  std::string error;

  explicit SparseConvAttributes(const OrtKernelInfo* info) {
    weight_shape = ReadIntsAttribute(info, kOp, "weight_shape", error);
    strides = ReadIntsAttribute(info, kOp, "strides", error);
    pads = ReadIntsAttribute(info, kOp, "pads", error);
    dilations = ReadIntsAttribute(info, kOp, "dilations", error);
    group = ReadIntAttributeOr(info, "group", 1);
    if (!error.empty()) return;
    const size_t spatial = weight_shape.size() >= 3 ? weight_shape.size() - 2 : 0;
    if (spatial < 1 || spatial > 2) {
      error = Message(kOp, ": weight_shape ", ShapeString(weight_shape),
                      " must be [M, C/group, k] or [M, C/group, kh, kw]");
      return;
    }
    error = Check(spatial);
  }

  std::string Check(size_t spatial) const {
    for (int64_t d : weight_shape)
      if (d <= 0) return Message(kOp, ": weight_shape ", ShapeString(weight_shape), " must be positive");
    if (strides.size() != spatial || dilations.size() != spatial || pads.size() != 2 * spatial) {
      return Message(kOp, ": strides ", ShapeString(strides), ", dilations ", ShapeString(dilations), " and pads ",
                     ShapeString(pads), " do not match a ", spatial, "-D kernel");
    }
    for (size_t a = 0; a < spatial; ++a) {
      if (strides[a] < 1 || dilations[a] < 1) return Message(kOp, ": strides and dilations must be >= 1");
    }
    for (int64_t p : pads)
      if (p < 0) return Message(kOp, ": pads ", ShapeString(pads), " must be >= 0");
    if (group < 1 || weight_shape[0] % group != 0) {
      return Message(kOp, ": group ", group, " must be >= 1 and divide M = ", weight_shape[0]);
    }
    return "";
  }

  // The geometry for input X, or an error.
  Ort::Status Shape(const std::vector<int64_t>& x, ConvShape& s) const {
    const size_t spatial = weight_shape.size() - 2;
    if (x.size() != spatial + 2) {
      return Error(Message(kOp, ": X has shape ", ShapeString(x), ", expected ", spatial + 2, "-D for weight_shape ",
                           ShapeString(weight_shape)));
    }
    s.batch = x[0];
    s.channels = x[1];
    s.filters = weight_shape[0];
    s.group_channels = weight_shape[1];
    s.group = group;
    if (s.channels != group * s.group_channels) {
      return Error(Message(kOp, ": X has ", s.channels, " channels, expected group * C/group = ", group * s.group_channels));
    }
    if (spatial == 2) {
      s.height = x[2];
      s.width = x[3];
      s.kh = weight_shape[2];
      s.kw = weight_shape[3];
      s.sh = strides[0];
      s.sw = strides[1];
      s.dh = dilations[0];
      s.dw = dilations[1];
      s.pad_top = pads[0];
      s.pad_left = pads[1];
      s.pad_bottom = pads[2];
      s.pad_right = pads[3];
    } else {
      s.width = x[2];
      s.kw = weight_shape[2];
      s.sw = strides[0];
      s.dw = dilations[0];
      s.pad_left = pads[0];
      s.pad_right = pads[1];
    }
    const int64_t span_h = s.height + s.pad_top + s.pad_bottom - s.dh * (s.kh - 1) - 1;
    const int64_t span_w = s.width + s.pad_left + s.pad_right - s.dw * (s.kw - 1) - 1;
    if (span_h < 0 || span_w < 0) {
      return Error(Message(kOp, ": X has shape ", ShapeString(x), ", smaller than the dilated kernel"));
    }
    s.out_h = span_h / s.sh + 1;
    s.out_w = span_w / s.sw + 1;
    if (PhaseLayout(s).Size(s) >= std::numeric_limits<int32_t>::max()) {
      return Error(Message(kOp, ": X has shape ", ShapeString(x), ": the lowered input exceeds 2^31 values"));
    }
    return Ort::Status{nullptr};
  }

  std::vector<int64_t> OutputShape(const ConvShape& s) const {
    if (weight_shape.size() == 4) return {s.batch, s.filters, s.out_h, s.out_w};
    return {s.batch, s.filters, s.out_w};
  }
};

// Y for every image once the inputs are checked.
template <typename Index>
void RunConv(OrtKernelContext* context, const ConvShape& s, const float* x, const float* values, const Index* cols,
             const int32_t* row_ptr, const float* bias, float* y) {
  const int64_t nnz = row_ptr[s.filters];
  const int64_t group_rows = s.filters / s.group;
  for (int64_t n = 0; n < s.batch; ++n) {
    Lowered b;
    const float* image = x + n * s.channels * s.height * s.width;
    Lower(context, image, s, b);
    float* out = y + n * s.filters * s.Positions();
    const bool wraps = b.row_length != s.out_w;
    std::unique_ptr<float[]> wide(wraps ? new float[static_cast<size_t>(s.filters * b.positions)] : nullptr);
    const double work = static_cast<double>(nnz) * static_cast<double>(b.positions) + 8.0 * s.filters;
    const size_t tasks = TaskCount(work, s.filters);
    const std::vector<int64_t> splits = BalancedRowSplits(row_ptr, s.filters, tasks);
    auto rows = [&](size_t t) {
      const int64_t r0 = splits[t], r1 = splits[t + 1];
      if (wraps) {
        ComputeRows(values, cols, row_ptr, r0, r1, b, group_rows, bias, wide.get(), b.positions);
        DropWrappedColumns(wide.get(), r0, r1, s, b.row_length, out);
      } else {
        ComputeRows(values, cols, row_ptr, r0, r1, b, group_rows, bias, out, s.Positions());
      }
    };
    ParallelFor(context, tasks, rows);
  }
}

// ---- SparseConv(X, values, col_indices, row_ptr[, bias]) -> Y -----------------------------------

template <typename Index>
struct SparseConvKernel : SparseConvAttributes {
  SparseConvKernel(const OrtApi*, const OrtKernelInfo* info) : SparseConvAttributes(info) {
    cache_.SetConstant(IsConstantInput(info, 1) && IsConstantInput(info, 2) && IsConstantInput(info, 3));
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    try {
      const std::vector<int64_t> weight_shape = ctx.GetAttrInts("weight_shape");
      Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(0);
      if (weight_shape.size() < 3 || shape.size() != weight_shape.size()) {
        return Error(Message(kOp, ": X must have as many dimensions as weight_shape")).release();
      }
      shape[1] = Ort::ShapeInferContext::SymbolicInteger(weight_shape[0]);
      // spatial sizes depend on strides and pads: left to the kernel when not all are known
      for (size_t a = 2; a < shape.size(); ++a) shape[a] = Ort::ShapeInferContext::SymbolicInteger(-1);
      return ctx.SetOutputShape(0, shape).release();
    } catch (const Ort::Exception& e) {
      return Ort::Status(e.what(), ORT_INVALID_ARGUMENT).release();
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<Index>& cols,
                      const Ort::Custom::Tensor<int32_t>& row_ptr,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    return Guarded(kOp, [&]() -> Ort::Status {
      if (!error.empty()) return Error(error);
      ConvShape s;
      Ort::Status status = Shape(x.Shape(), s);
      if (!status.IsOK()) return status;
      status = CheckWeight(values, cols, row_ptr);
      if (!status.IsOK()) return status;
      const float* b = nullptr;
      status = ReadBias(kOp, bias, s.filters, &b);
      if (!status.IsOK()) return status;
      float* out = y.Allocate(OutputShape(s));
      if (s.batch == 0 || s.Positions() == 0) return Ort::Status{nullptr};
      RunConv(context, s, x.Data(), values.Data(), cols.Data(), row_ptr.Data(), b, out);
      return Ort::Status{nullptr};
    });
  }

 private:
  Ort::Status CheckWeight(const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<Index>& cols,
                          const Ort::Custom::Tensor<int32_t>& row_ptr) {
    const std::vector<int64_t> v = values.Shape(), c = cols.Shape(), r = row_ptr.Shape();
    const int64_t rows = weight_shape[0];
    Ort::Status shapes = CheckCsrShapes(kOp, v, c, r, rows);
    if (!shapes.IsOK()) return shapes;
    const Index* ci = cols.Data();
    const int32_t* rp = row_ptr.Data();
    if (cache_.Valid(ci, rp, values.Data())) return Ort::Status{nullptr};
    int64_t columns = 1;
    for (size_t a = 1; a < weight_shape.size(); ++a) columns *= weight_shape[a];
    Ort::Status status = ValidateCsr(kOp, rp, r[0], ci, c[0], v[0], rows, columns);
    if (status.IsOK()) cache_.Remember(ci, rp, values.Data());
    return status;
  }

  ValidationCache cache_;
};

}  // namespace

void AddSparseConv(Ort::CustomOpDomain& domain) {
  using Ort::Custom::CreateLiteCustomOp;
  using Ort::Custom::OrtLiteCustomOp;
  static std::unique_ptr<OrtLiteCustomOp> ops[] = {
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<SparseConvKernel<int32_t>>("SparseConv", "CPUExecutionProvider")},
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<SparseConvKernel<uint16_t>>("SparseConv", "CPUExecutionProvider")},
  };
  for (auto& op : ops) domain.Add(op.get());
}

}  // namespace onnxcompress
