// onnxruntime bindings of the CUDA kernels (CUDAExecutionProvider), same names and inputs as
// the CPU ops. Inputs and outputs live on the device; the kernels run on onnxruntime's stream.
// Constant CSR structures are validated once on the device (ValidateCsr), fed ones every run.
#include "../src/common.h"
#include "kernels.cuh"

namespace onnxcompress {
namespace {

Ort::Status CudaError(const char* op, cudaError_t error) {
  return Ort::Status(Message(op, ": CUDA error ", cudaGetErrorString(error)).c_str(), ORT_RUNTIME_EXCEPTION);
}

template <typename T>
T ReadDevice(const T* pointer, int64_t index) {
  T value{};
  cudaMemcpy(&value, pointer + index, sizeof(T), cudaMemcpyDeviceToHost);
  return value;
}

// Turn a device-side problem report into the CPU kernels' messages, with the offending values.
template <typename Index>
Ort::Status Describe(const char* op, const cuda::CsrProblem& problem, const int32_t* row_ptr, int64_t n,
                     const Index* cols, int64_t nnz, int64_t k, const uint8_t* indices, int64_t codebook_size) {
  switch (problem.kind) {
    case 0:
      return Ort::Status{nullptr};
    case 1:
      return Error(Message(op, ": row_ptr[0] = ", ReadDevice(row_ptr, 0), ", expected 0"));
    case 2:
      return Error(Message(op, ": row_ptr decreases at ", problem.position, ": ",
                           ReadDevice(row_ptr, problem.position - 1), " > ", ReadDevice(row_ptr, problem.position)));
    case 3:
      return Error(Message(op, ": row_ptr[N] = ", ReadDevice(row_ptr, n), " but col_indices has ", nnz, " entries"));
    case 4:
      return Error(Message(op, ": col_indices[", problem.position, "] = ",
                           static_cast<int64_t>(ReadDevice(cols, problem.position)), " is out of range [0, ", k, ")"));
    default:
      return Error(Message(op, ": indices[", problem.position, "] = ", int{ReadDevice(indices, problem.position)},
                           " is out of range for a codebook of ", codebook_size, " entries"));
  }
}

template <typename Index, bool Codebook>
struct CudaSparseKernel {
  static constexpr const char* kOp = Codebook ? "SparseCodebookMatMul" : "SparseMatMul";

  CudaSparseKernel(const OrtApi*, const OrtKernelInfo* info) {
    k_ = ReadIntAttribute(info, kOp, "K", error_);
    n_ = ReadIntAttribute(info, kOp, "N", error_);
    cache_.SetConstant(IsConstantInput(info, 1) && IsConstantInput(info, 2) && IsConstantInput(info, 3) &&
                       (!Codebook || IsConstantInput(info, 4)));
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) { return InferMatMulShape(ctx).release(); }

  Ort::Status Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const float* values,
                  const Ort::Custom::Tensor<Index>& cols, const Ort::Custom::Tensor<int32_t>& row_ptr,
                  const uint8_t* indices, const float* codebook, int64_t codebook_size, int64_t values_size,
                  std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    if (!error_.empty()) return Error(error_);
    const std::vector<int64_t> x_shape = x.Shape();
    if (x_shape.empty() || x_shape.back() != k_) {
      return Error(Message(kOp, ": X has shape ", ShapeString(x_shape), ", its last dimension must be K = ", k_));
    }
    const int64_t nnz = cols.Shape()[0];
    if (values_size != nnz) {
      return Error(Message(kOp, ": values has ", values_size, " entries but col_indices has ", nnz));
    }
    if (row_ptr.Shape()[0] != n_ + 1) {
      return Error(Message(kOp, ": row_ptr has ", row_ptr.Shape()[0], " entries, expected N + 1 = ", n_ + 1));
    }
    auto stream = static_cast<cudaStream_t>(Ort::KernelContext(context).GetGPUComputeStream());
    if (!cache_.Valid(cols.Data(), row_ptr.Data(), indices, codebook_size)) {
      cuda::CsrProblem problem{};
      cudaError_t error = cuda::ValidateCsr(stream, row_ptr.Data(), n_, cols.Data(), nnz, k_, indices,
                                            codebook_size, &problem);
      if (error != cudaSuccess) return CudaError(kOp, error);
      Ort::Status status = Describe(kOp, problem, row_ptr.Data(), n_, cols.Data(), nnz, k_, indices, codebook_size);
      if (!status.IsOK()) return status;
      cache_.Remember(cols.Data(), row_ptr.Data(), indices, codebook_size);
    }
    const float* b = nullptr;
    Ort::Status status = ReadBias(kOp, bias, n_, &b);
    if (!status.IsOK()) return status;
    float* out = y.Allocate(OutputShape(x_shape, n_));
    const int64_t m = NumElements(x_shape) / k_;
    const cudaError_t error = cuda::SparseMatMul(stream, x.Data(), m, k_, n_, values, indices, codebook,
                                                 codebook_size, cols.Data(), row_ptr.Data(), b, out);
    return error == cudaSuccess ? Ort::Status{nullptr} : CudaError(kOp, error);
  }

 protected:
  int64_t k_ = 0;
  int64_t n_ = 0;
  std::string error_;
  ValidationCache cache_;
};

template <typename Index>
struct CudaSparseMatMul : CudaSparseKernel<Index, false> {
  using CudaSparseKernel<Index, false>::CudaSparseKernel;
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<float>& values, const Ort::Custom::Tensor<Index>& cols,
                      const Ort::Custom::Tensor<int32_t>& row_ptr,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    return Guarded(this->kOp, [&] {
      return this->Run(context, x, values.Data(), cols, row_ptr, nullptr, nullptr, 0, values.Shape()[0], bias, y);
    });
  }
};

template <typename Index>
struct CudaSparseCodebookMatMul : CudaSparseKernel<Index, true> {
  using CudaSparseKernel<Index, true>::CudaSparseKernel;
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<uint8_t>& indices, const Ort::Custom::Tensor<Index>& cols,
                      const Ort::Custom::Tensor<int32_t>& row_ptr, const Ort::Custom::Tensor<float>& codebook,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    return Guarded(this->kOp, [&]() -> Ort::Status {
      const int64_t size = NumElements(codebook.Shape());
      if (codebook.Shape().size() != 1 || size < 1 || size > 256) {
        return Error(Message(this->kOp, ": codebook has shape ", ShapeString(codebook.Shape()),
                             ", expected [C] with 1 <= C <= 256"));
      }
      return this->Run(context, x, nullptr, cols, row_ptr, indices.Data(), codebook.Data(), size,
                       indices.Shape()[0], bias, y);
    });
  }
};

struct CudaCodebookMatMul {
  static constexpr const char* kOp = "CodebookMatMul";

  CudaCodebookMatMul(const OrtApi*, const OrtKernelInfo* info) {
    k_ = ReadIntAttribute(info, kOp, "K", error_);
    n_ = ReadIntAttribute(info, kOp, "N", error_);
    bits_ = ReadIntAttributeOr(info, "bits", 8);
    if (error_.empty() && bits_ != 8 && bits_ != 4) error_ = Message(kOp, ": attribute bits = ", bits_, ", expected 4 or 8");
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) { return InferMatMulShape(ctx).release(); }

  // Out-of-range indices read the zero-padded 256-entry table on the device: no fault, and
  // the CPU kernel (and the numpy reference) report them.
  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x,
                      const Ort::Custom::Tensor<uint8_t>& indices, const Ort::Custom::Tensor<float>& codebook,
                      std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    return Guarded(kOp, [&]() -> Ort::Status {
      if (!error_.empty()) return Error(error_);
      const std::vector<int64_t> x_shape = x.Shape();
      if (x_shape.empty() || x_shape.back() != k_) {
        return Error(Message(kOp, ": X has shape ", ShapeString(x_shape), ", its last dimension must be K = ", k_));
      }
      const int64_t row_bytes = bits_ == 8 ? k_ : (k_ + 1) / 2;
      const std::vector<int64_t> i_shape = indices.Shape();
      if (i_shape.size() != 2 || i_shape[0] != n_ || i_shape[1] != row_bytes) {
        return Error(Message(kOp, ": indices has shape ", ShapeString(i_shape), ", expected [", n_, ", ", row_bytes, "]"));
      }
      const int64_t size = NumElements(codebook.Shape());
      if (codebook.Shape().size() != 1 || size < 1 || size > (int64_t{1} << bits_)) {
        return Error(Message(kOp, ": codebook has shape ", ShapeString(codebook.Shape()), ", expected [C] with 1 <= C <= ",
                             int64_t{1} << bits_));
      }
      const float* b = nullptr;
      Ort::Status status = ReadBias(kOp, bias, n_, &b);
      if (!status.IsOK()) return status;
      float* out = y.Allocate(OutputShape(x_shape, n_));
      auto stream = static_cast<cudaStream_t>(Ort::KernelContext(context).GetGPUComputeStream());
      const cudaError_t error = cuda::CodebookMatMul(stream, x.Data(), NumElements(x_shape) / k_, k_, n_,
                                                     indices.Data(), static_cast<int>(bits_), codebook.Data(), size, b, out);
      return error == cudaSuccess ? Ort::Status{nullptr} : CudaError(kOp, error);
    });
  }

 private:
  int64_t k_ = 0;
  int64_t n_ = 0;
  int64_t bits_ = 8;
  std::string error_;
};

}  // namespace

void AddCudaOps(Ort::CustomOpDomain& domain) {
  using Ort::Custom::CreateLiteCustomOp;
  using Ort::Custom::OrtLiteCustomOp;
  constexpr const char* kEp = "CUDAExecutionProvider";
  static std::unique_ptr<OrtLiteCustomOp> ops[] = {
      std::unique_ptr<OrtLiteCustomOp>{CreateLiteCustomOp<CudaSparseMatMul<int32_t>>("SparseMatMul", kEp)},
      std::unique_ptr<OrtLiteCustomOp>{CreateLiteCustomOp<CudaSparseMatMul<uint16_t>>("SparseMatMul", kEp)},
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<CudaSparseCodebookMatMul<int32_t>>("SparseCodebookMatMul", kEp)},
      std::unique_ptr<OrtLiteCustomOp>{
          CreateLiteCustomOp<CudaSparseCodebookMatMul<uint16_t>>("SparseCodebookMatMul", kEp)},
      std::unique_ptr<OrtLiteCustomOp>{CreateLiteCustomOp<CudaCodebookMatMul>("CodebookMatMul", kEp)},
  };
  for (auto& op : ops) domain.Add(op.get());
}

}  // namespace onnxcompress
