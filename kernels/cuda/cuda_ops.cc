// onnxruntime bindings of the CUDA kernels (CUDAExecutionProvider), same names and inputs as
// the CPU ops. Inputs and outputs live on the device; the kernels run on onnxruntime's stream.
// Constant CSR structures are validated once on the device (cuda::ValidateCsr), fed ones every run;
// every other check, and every message, is the CPU kernels' (../src/validate.h).
#include "../src/common.h"
#include "../src/validate.h"
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

// Turn a device-side problem report into the CPU kernels' messages (validate.h), with the
// offending values read back.
template <typename Index>
Ort::Status Describe(const char* op, const cuda::CsrProblem& problem, const int32_t* row_ptr, int64_t n,
                     const Index* cols, int64_t nnz, int64_t k, const uint8_t* indices, int64_t codebook_size) {
  switch (problem.kind) {
    case 0:
      return Ort::Status{nullptr};
    case 1:
      return RowPtrStartError(op, ReadDevice(row_ptr, 0));
    case 2:
      return RowPtrDecreasesError(op, problem.position, ReadDevice(row_ptr, problem.position - 1),
                                  ReadDevice(row_ptr, problem.position));
    case 3:
      return RowPtrEndError(op, ReadDevice(row_ptr, n), nnz);
    case 4:
      return ColumnError(op, problem.position, static_cast<int64_t>(ReadDevice(cols, problem.position)), k);
    default:
      return CodebookIndexError(op, problem.position, ReadDevice(indices, problem.position), codebook_size);
  }
}

template <typename Index, bool Codebook>
struct CudaSparseKernel {
  static constexpr const char* kOp = Codebook ? "SparseCodebookMatMul" : "SparseMatMul";

  CudaSparseKernel(const OrtApi*, const OrtKernelInfo* info) {
    error_ = ReadSizes(info, kOp, k_, n_);
    cache_.SetConstant(IsConstantInput(info, 1) && IsConstantInput(info, 2) && IsConstantInput(info, 3) &&
                       (!Codebook || IsConstantInput(info, 4)));
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) { return InferMatMulShape(ctx).release(); }

  Ort::Status Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const float* values,
                  const Ort::Custom::Tensor<Index>& cols, const Ort::Custom::Tensor<int32_t>& row_ptr,
                  const uint8_t* indices, const float* codebook, int64_t codebook_size,
                  const std::vector<int64_t>& values_shape,
                  std::optional<const Ort::Custom::Tensor<float>*> bias, Ort::Custom::Tensor<float>& y) {
    if (!error_.empty()) return Error(error_);
    const std::vector<int64_t> x_shape = x.Shape();
    Ort::Status checked = CheckX(kOp, x_shape, k_);
    if (checked.IsOK()) checked = CheckCsrShapes(kOp, values_shape, cols.Shape(), row_ptr.Shape(), n_);
    if (!checked.IsOK()) return checked;
    const int64_t nnz = cols.Shape()[0];
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
      return this->Run(context, x, values.Data(), cols, row_ptr, nullptr, nullptr, 0, values.Shape(), bias, y);
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
      Ort::Status checked = CheckCodebook(this->kOp, codebook.Shape(), 256);
      if (!checked.IsOK()) return checked;
      return this->Run(context, x, nullptr, cols, row_ptr, indices.Data(), codebook.Data(), codebook.Shape()[0],
                       indices.Shape(), bias, y);
    });
  }
};

struct CudaCodebookMatMul {
  static constexpr const char* kOp = "CodebookMatMul";

  CudaCodebookMatMul(const OrtApi*, const OrtKernelInfo* info) {
    error_ = ReadCodebookAttributes(info, kOp, k_, n_, bits_);
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
      Ort::Status checked = CheckX(kOp, x_shape, k_);
      if (checked.IsOK()) checked = CheckPackedIndices(kOp, indices.Shape(), k_, n_, bits_);
      if (checked.IsOK()) checked = CheckCodebook(kOp, codebook.Shape(), int64_t{1} << bits_);
      if (!checked.IsOK()) return checked;
      const int64_t size = codebook.Shape()[0];
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
