// Input validation shared by the CPU kernels (kernels/src) and their CUDA versions (kernels/cuda):
// one function per rule, so that both builds refuse the same inputs with the same message.
// The inputs each op takes are listed once, in onnxcompress/formats/kernel_ops.py (KERNEL_OPS),
// and tests/formats/test_kernel_ops.py holds both builds' registrations to it.
#pragma once

#include "common.h"

namespace onnxcompress {

// Attributes K and N, required and positive; "" when fine, else the message.
inline std::string ReadSizes(const OrtKernelInfo* info, const char* op, int64_t& k, int64_t& n) {
  std::string error;
  k = ReadIntAttribute(info, op, "K", error);
  n = ReadIntAttribute(info, op, "N", error);
  if (error.empty() && (k <= 0 || n <= 0)) {
    error = Message(op, ": attributes K = ", k, " and N = ", n, " must be positive");
  }
  return error;
}

// CodebookMatMul's attributes: K and N as above, bits 4 or 8 (default 8).
inline std::string ReadCodebookAttributes(const OrtKernelInfo* info, const char* op, int64_t& k, int64_t& n,
                                          int64_t& bits) {
  std::string error = ReadSizes(info, op, k, n);
  bits = ReadIntAttributeOr(info, "bits", 8);
  if (error.empty() && bits != 8 && bits != 4) error = Message(op, ": attribute bits = ", bits, ", expected 4 or 8");
  return error;
}

// X: at least one dimension, the last one K.
inline Ort::Status CheckX(const char* op, const std::vector<int64_t>& x_shape, int64_t k) {
  if (x_shape.empty() || x_shape.back() != k) {
    return Error(Message(op, ": X has shape ", ShapeString(x_shape), ", its last dimension must be K = ", k));
  }
  return Ort::Status{nullptr};
}

// The CSR arrays' shapes: values (or codebook indices), col_indices and row_ptr 1-D, one column
// per value, N + 1 row pointers. Their contents: ValidateCsr (CPU) or cuda::ValidateCsr.
inline Ort::Status CheckCsrShapes(const char* op, const std::vector<int64_t>& v_shape,
                                  const std::vector<int64_t>& c_shape, const std::vector<int64_t>& r_shape,
                                  int64_t n) {
  if (v_shape.size() != 1 || c_shape.size() != 1 || r_shape.size() != 1) {
    return Error(Message(op, ": values ", ShapeString(v_shape), ", col_indices ", ShapeString(c_shape),
                         " and row_ptr ", ShapeString(r_shape), " must be 1-D"));
  }
  if (v_shape[0] != c_shape[0]) {
    return Error(Message(op, ": values has ", v_shape[0], " entries but col_indices has ", c_shape[0]));
  }
  if (r_shape[0] != n + 1) {
    return Error(Message(op, ": row_ptr has ", r_shape[0], " entries, expected N + 1 = ", n + 1));
  }
  return Ort::Status{nullptr};
}

// A codebook: 1-D with 1 .. `most` entries (256 for the sparse op, 2^bits for CodebookMatMul).
inline Ort::Status CheckCodebook(const char* op, const std::vector<int64_t>& shape, int64_t most) {
  if (shape.size() != 1 || shape[0] < 1 || shape[0] > most) {
    return Error(Message(op, ": codebook has shape ", ShapeString(shape), ", expected [C] with 1 <= C <= ", most));
  }
  return Ort::Status{nullptr};
}

// Bytes per row of CodebookMatMul's indices: K at 8 bits, ceil(K / 2) at 4.
inline int64_t PackedRowBytes(int64_t k, int64_t bits) { return bits == 8 ? k : (k + 1) / 2; }

// CodebookMatMul's indices: [N, PackedRowBytes(K, bits)].
inline Ort::Status CheckPackedIndices(const char* op, const std::vector<int64_t>& shape, int64_t k, int64_t n,
                                      int64_t bits) {
  const int64_t row_bytes = PackedRowBytes(k, bits);
  if (shape.size() != 2 || shape[0] != n || shape[1] != row_bytes) {
    return Error(Message(op, ": indices has shape ", ShapeString(shape), ", expected [", n, ", ", row_bytes,
                         "] for K = ", k, ", N = ", n, ", bits = ", bits));
  }
  return Ort::Status{nullptr};
}

// The messages of a malformed CSR structure, whoever found it (the CPU scan or the device one).
inline Ort::Status RowPtrStartError(const char* op, int64_t first) {
  return Error(Message(op, ": row_ptr[0] = ", first, ", expected 0"));
}
inline Ort::Status RowPtrDecreasesError(const char* op, int64_t at, int64_t before, int64_t value) {
  return Error(Message(op, ": row_ptr decreases at ", at, ": ", before, " > ", value));
}
inline Ort::Status RowPtrEndError(const char* op, int64_t last, int64_t nnz) {
  return Error(Message(op, ": row_ptr[N] = ", last, " but col_indices has ", nnz, " entries"));
}
inline Ort::Status ColumnError(const char* op, int64_t at, int64_t column, int64_t columns) {
  return Error(Message(op, ": col_indices[", at, "] = ", column, " is out of range [0, ", columns, ")"));
}
inline Ort::Status CodebookIndexError(const char* op, int64_t at, int64_t index, int64_t size) {
  return Error(Message(op, ": indices[", at, "] = ", index, " is out of range for a codebook of ", size, " entries"));
}

// Check a CSR structure (rows x columns, nnz entries) on the host; return an error naming the value.
template <typename Index>
Ort::Status ValidateCsr(const char* op, const int32_t* row_ptr, int64_t row_ptr_size, const Index* cols,
                        int64_t nnz, int64_t values_size, int64_t rows, int64_t columns) {
  if (row_ptr_size != rows + 1) {
    return Error(Message(op, ": row_ptr has ", row_ptr_size, " entries, expected N + 1 = ", rows + 1));
  }
  if (values_size != nnz) {
    return Error(Message(op, ": values has ", values_size, " entries but col_indices has ", nnz));
  }
  if (row_ptr[0] != 0) return RowPtrStartError(op, row_ptr[0]);
  for (int64_t r = 0; r < rows; ++r) {
    if (row_ptr[r + 1] < row_ptr[r]) return RowPtrDecreasesError(op, r + 1, row_ptr[r], row_ptr[r + 1]);
  }
  if (row_ptr[rows] != nnz) return RowPtrEndError(op, row_ptr[rows], nnz);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t c = static_cast<int64_t>(cols[j]);
    if (c < 0 || c >= columns) return ColumnError(op, j, c, columns);
  }
  return Ort::Status{nullptr};
}

// Error naming the first codebook index >= size, if any (host memory).
inline Ort::Status CheckCodebookIndices(const char* op, const uint8_t* indices, int64_t count, int64_t size) {
  for (int64_t j = 0; j < count; ++j) {
    if (indices[j] >= size) return CodebookIndexError(op, j, indices[j], size);
  }
  return Ort::Status{nullptr};
}

}  // namespace onnxcompress
