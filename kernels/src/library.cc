// The onnxcompress custom-op library: one entry point, domain ai.onnxcompress.
//
// Built against onnxruntime's headers only (no link to libonnxruntime). The minimum runtime is
// the header's API version: RegisterCustomOps asks for it and, on an older runtime, returns a
// status that says so instead of crashing.
#include "common.h"

#include <cstdlib>
#include <mutex>

namespace {

std::vector<Ort::CustomOpDomain>& Domains() {
  static std::vector<Ort::CustomOpDomain> domains;
  return domains;
}

std::mutex& DomainsMutex() {
  static std::mutex mutex;
  return mutex;
}

}  // namespace

extern "C" {

// The op names this build provides, comma separated (read by onnxcompress.runtime.available_ops).
__attribute__((visibility("default"))) const char* OnnxCompressKernelOps() {
#ifdef ONNXCOMPRESS_WITH_CUDA
  return "SparseMatMul,SparseCodebookMatMul,CodebookMatMul,SparseConv,cuda:SparseMatMul,cuda:SparseCodebookMatMul,cuda:CodebookMatMul";
#else
  return "SparseMatMul,SparseCodebookMatMul,CodebookMatMul,SparseConv";
#endif
}

__attribute__((visibility("default"))) int OnnxCompressKernelApiVersion() { return ORT_API_VERSION; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                   const OrtApiBase* api_base) {
  // ONNXCOMPRESS_KERNELS_API_VERSION asks for a newer API than the headers' (tests use it to
  // play an onnxruntime older than the headers).
  uint32_t wanted = ORT_API_VERSION;
  if (const char* forced = std::getenv("ONNXCOMPRESS_KERNELS_API_VERSION")) {
    wanted = std::max<uint32_t>(wanted, static_cast<uint32_t>(std::strtoul(forced, nullptr, 10)));
  }
  const OrtApi* api = api_base->GetApi(wanted);
  if (api == nullptr) {
    const OrtApi* oldest = api_base->GetApi(1);
    const std::string message = onnxcompress::Message(
        "onnxcompress kernels were built for onnxruntime API ", wanted, " but this onnxruntime (",
        api_base->GetVersionString(), ") is older; upgrade onnxruntime or rebuild the kernels against its headers");
    return oldest->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    std::lock_guard<std::mutex> lock(DomainsMutex());
    Ort::CustomOpDomain domain{onnxcompress::kDomain};
    onnxcompress::AddSparseOps(domain);
    onnxcompress::AddCodebookMatMul(domain);
    onnxcompress::AddSparseConv(domain);
#ifdef ONNXCOMPRESS_WITH_CUDA
    onnxcompress::AddCudaOps(domain);
#endif
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    Domains().push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // extern "C"
