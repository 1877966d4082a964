// Shared helpers of the onnxcompress kernel library: statuses that carry values,
// onnxruntime's thread pool through KernelContext::ParallelFor, attribute reading
// (input validation shared with the CUDA kernels: validate.h).
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace onnxcompress {

constexpr const char* kDomain = "ai.onnxcompress";

// Build "SparseMatMul: col_indices[12] = 4096 is out of range [0, 4096)" style messages.
template <typename... Parts>
std::string Message(Parts&&... parts) {
  std::ostringstream stream;
  (stream << ... << std::forward<Parts>(parts));
  return stream.str();
}

inline Ort::Status Error(const std::string& message) {
  return Ort::Status(message.c_str(), ORT_INVALID_ARGUMENT);
}

inline std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream stream;
  stream << "[";
  for (size_t i = 0; i < shape.size(); ++i) stream << (i ? ", " : "") << shape[i];
  stream << "]";
  return stream.str();
}

inline int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  return count;
}

// Run fn(task) for task in [0, tasks) on onnxruntime's intra-op pool (never OpenMP).
// fn must not throw.
template <typename Fn>
void ParallelFor(OrtKernelContext* context, size_t tasks, Fn& fn) {
  if (tasks == 0) return;
  if (tasks == 1) {
    fn(size_t{0});
    return;
  }
  Ort::KernelContext ctx(context);
  ctx.ParallelFor([](void* data, size_t task) { (*static_cast<Fn*>(data))(task); }, tasks, 0, &fn);
}

// Split rows [0, rows) into `tasks` ranges holding about the same number of non-zeros,
// using the CSR row pointer (work per row ~ its non-zeros plus a constant).
inline std::vector<int64_t> BalancedRowSplits(const int32_t* row_ptr, int64_t rows, size_t tasks) {
  std::vector<int64_t> splits(tasks + 1, rows);
  splits[0] = 0;
  const double total = static_cast<double>(row_ptr[rows]) + static_cast<double>(rows);
  for (size_t t = 1; t < tasks; ++t) {
    const double target = total * static_cast<double>(t) / static_cast<double>(tasks);
    // first row r with row_ptr[r] + r >= target
    int64_t lo = splits[t - 1], hi = rows;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<double>(row_ptr[mid]) + static_cast<double>(mid) < target) lo = mid + 1;
      else hi = mid;
    }
    splits[t] = lo;
  }
  return splits;
}

// How many tasks to cut `work` multiply-adds into: enough to balance two to a few threads,
// not so many that scheduling dominates.
inline size_t TaskCount(double work, int64_t rows) {
  const double per_task = 65536.0;
  size_t tasks = static_cast<size_t>(std::clamp(work / per_task, 1.0, 64.0));
  return std::min<size_t>(tasks, static_cast<size_t>(std::max<int64_t>(rows, 1)));
}

// Whether input `index` is a constant initializer (its data never changes between runs).
inline bool IsConstantInput(const OrtKernelInfo* info, size_t index) {
  int is_constant = 0;
  try {
    Ort::ConstKernelInfo(info).GetTensorConstantInput(index, &is_constant);
  } catch (const Ort::Exception&) {
    return false;
  }
  return is_constant != 0;
}

// Remembers that constant inputs were validated, keyed by their data pointers and a size, so
// that the check runs once for initializers and on every run for tensors fed at run time.
class ValidationCache {
 public:
  bool Valid(const void* a, const void* b, const void* c = nullptr, int64_t tag = 0) const {
    return constant_ && done_.load(std::memory_order_acquire) && a == a_ && b == b_ && c == c_ && tag == tag_;
  }
  void Remember(const void* a, const void* b, const void* c = nullptr, int64_t tag = 0) {
    if (!constant_ || done_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_.load(std::memory_order_relaxed)) return;
    a_ = a;
    b_ = b;
    c_ = c;
    tag_ = tag;
    done_.store(true, std::memory_order_release);
  }
  void SetConstant(bool constant) { constant_ = constant; }

 private:
  bool constant_ = false;
  std::atomic<bool> done_{false};
  std::mutex mutex_;
  const void* a_ = nullptr;
  const void* b_ = nullptr;
  const void* c_ = nullptr;
  int64_t tag_ = 0;
};

// Read an int attribute without throwing; records an error message when absent or invalid.
inline int64_t ReadIntAttribute(const OrtKernelInfo* info, const char* op, const char* name, std::string& error) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception& e) {
    if (error.empty()) error = Message(op, ": attribute ", name, " is missing or not an int (", e.what(), ")");
    return 0;
  }
}

// Read a required ints attribute without throwing; records an error message when absent or invalid.
inline std::vector<int64_t> ReadIntsAttribute(const OrtKernelInfo* info, const char* op, const char* name,
                                              std::string& error) {
  try {
    return Ort::ConstKernelInfo(info).GetAttributes<int64_t>(name);
  } catch (const Ort::Exception& e) {
    if (error.empty()) error = Message(op, ": attribute ", name, " is missing or not ints (", e.what(), ")");
    return {};
  }
}

inline int64_t ReadIntAttributeOr(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

// Output shape: X's leading dims then `last`.
inline std::vector<int64_t> OutputShape(const std::vector<int64_t>& x_shape, int64_t last) {
  std::vector<int64_t> shape(x_shape.begin(), x_shape.end() - 1);
  shape.push_back(last);
  return shape;
}

// Shape inference shared by every op: Y = X.shape[:-1] + [N] (N from the attribute).
Ort::Status InferMatMulShape(Ort::ShapeInferContext& ctx);

// Validated optional bias: nullptr when absent, an error status when its size is not n.
Ort::Status ReadBias(const char* op, std::optional<const Ort::Custom::Tensor<float>*> bias, int64_t n,
                     const float** data);

// Run fn() turning exceptions into statuses that name the op.
template <typename Fn>
Ort::Status Guarded(const char* op, Fn&& fn) {
  try {
    return fn();
  } catch (const Ort::Exception& e) {
    return Ort::Status(Message(op, ": ", e.what()).c_str(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return Ort::Status(Message(op, ": ", e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  }
}

// Each file registers its ops (both index types where the op has column indices).
void AddSparseOps(Ort::CustomOpDomain& domain);     // SparseMatMul, SparseCodebookMatMul
void AddCodebookMatMul(Ort::CustomOpDomain& domain);  // CodebookMatMul
void AddSparseConv(Ort::CustomOpDomain& domain);      // SparseConv (CPU only)
void AddCudaOps(Ort::CustomOpDomain& domain);         // all three on CUDAExecutionProvider (CUDA build)

}  // namespace onnxcompress
