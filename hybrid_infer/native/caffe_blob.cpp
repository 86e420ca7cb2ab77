// hybrid_infer_native: device and host pointers of pycaffe blobs, for zero-copy hand-offs.
//
// pycaffe exposes a blob's memory only as a host numpy array, so a tensor that stays on
// the GPU between two engines would cross the PCIe bus twice. This module reaches the
// caffe::Blob<float> behind a pycaffe Blob object (through Boost.Python's registry, which
// _caffe.so shares with us via libboost_python) and exposes Caffe's own SyncedMemory calls.
//
// Ownership: set_gpu_data lends memory to a blob. Caffe marks it not owned and never frees
// it; the lender (an engine of the executor) keeps it alive for as long as the blob may
// read it, and reset_data ends the loan. Pointers returned by gpu_data/cpu_data belong to
// Caffe and stay valid until the blob is reshaped larger or destroyed.
//
// Streams: Caffe launches its kernels and copies on the legacy default stream.
// synchronize() waits for that stream, which is what a consumer on another stream needs
// before it reads what Caffe wrote.
//
// Built by scripts/build-native.sh against the Caffe it runs with, with that build's
// flags (CPU_ONLY changes Caffe's headers). In a CPU-only build the device calls raise.

#include <boost/python.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "caffe/blob.hpp"
#include "caffe/syncedmem.hpp"

#ifndef HYBRID_INFER_CAFFE_BUILD
#error "compile with -DHYBRID_INFER_CAFFE_BUILD=\"<the Caffe prefix's BUILD_INFO line>\""
#endif

namespace bp = boost::python;
using FloatBlob = caffe::Blob<float>;

namespace {

// Blob keeps its SyncedMemory and capacity protected; a pointer to member taken through a
// subclass is the standard-conforming way to reach them without a patched Caffe.
struct BlobInternals : FloatBlob {
  static boost::shared_ptr<caffe::SyncedMemory>& data(FloatBlob& blob) {
    return blob.*(&BlobInternals::data_);
  }
  static int capacity(const FloatBlob& blob) { return blob.*(&BlobInternals::capacity_); }
  static int& capacity(FloatBlob& blob) { return blob.*(&BlobInternals::capacity_); }
};

std::uintptr_t address(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr); }

#ifndef CPU_ONLY
void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
  }
}
#else
[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) +
                           ": this Caffe was built without CUDA (CPU_ONLY); rebuild it with "
                           "scripts/setup.sh --cuda");
}
#endif

// The BUILD_INFO line of the Caffe this module was compiled against, so Python can
// refuse a module that meets another Caffe (a different flavour lays out other code).
std::string built_against() { return HYBRID_INFER_CAFFE_BUILD; }

bool cuda_enabled() {
#ifdef CPU_ONLY
  return false;
#else
  return true;
#endif
}

// Number of visible GPUs. Raises with CUDA's reason when the driver or device is missing,
// so callers can say why before Caffe's fatal CUDA_CHECKs abort the process.
int device_count() {
#ifdef CPU_ONLY
  no_cuda("device_count");
#else
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
#endif
}

std::string device_name(int device) {
#ifdef CPU_ONLY
  no_cuda("device_name");
#else
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return prop.name;
#endif
}

int current_device() {
#ifdef CPU_ONLY
  no_cuda("current_device");
#else
  int device = -1;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
#endif
}

// Host pointer of the blob's data, copied from the device first if the device is newer.
std::uintptr_t cpu_data(FloatBlob& blob) { return address(blob.cpu_data()); }

// Host pointer the caller will write: marks the host copy as the newest.
std::uintptr_t mutable_cpu_data(FloatBlob& blob) { return address(blob.mutable_cpu_data()); }

// Device pointer of the blob's data, copied from the host first if the host is newer.
std::uintptr_t gpu_data(FloatBlob& blob) {
#ifdef CPU_ONLY
  no_cuda("gpu_data");
#else
  return address(blob.gpu_data());
#endif
}

// Device pointer the caller will write: marks the device copy as the newest.
std::uintptr_t mutable_gpu_data(FloatBlob& blob) {
#ifdef CPU_ONLY
  no_cuda("mutable_gpu_data");
#else
  return address(blob.mutable_gpu_data());
#endif
}

// Lend device memory to the blob: its data now lives at ptr (at least count floats on
// Caffe's current device). Caffe will not free it; reset_data ends the loan. The blob gets
// a SyncedMemory of exactly count floats first: Caffe copies a SyncedMemory's whole size
// between host and device, and a blob set up for a larger batch (GoogLeNet's prototxt says
// 10) keeps that capacity, so a host read of a batch-1 loan ran past the lent buffer
// (cudaMemcpy: invalid argument, seen on an H200 with ONNX Runtime's outputs). The capacity
// follows, so that a later reshape to a larger batch allocates anew.
void set_gpu_data(FloatBlob& blob, std::uintptr_t ptr) {
#ifdef CPU_ONLY
  no_cuda("set_gpu_data");
#else
  if (ptr == 0) throw std::invalid_argument("set_gpu_data: null device pointer");
  cudaPointerAttributes attributes;
  check(cudaPointerGetAttributes(&attributes, reinterpret_cast<void*>(ptr)),
        "set_gpu_data: cudaPointerGetAttributes");
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument("set_gpu_data: the pointer is not device memory");
  }
  if (attributes.device != current_device()) {
    throw std::invalid_argument("set_gpu_data: the memory is on GPU " +
                                std::to_string(attributes.device) + ", Caffe runs on GPU " +
                                std::to_string(current_device()));
  }
  BlobInternals::capacity(blob) = blob.count();
  BlobInternals::data(blob).reset(new caffe::SyncedMemory(static_cast<size_t>(blob.count()) * sizeof(float)));
  BlobInternals::data(blob)->set_gpu_data(reinterpret_cast<void*>(ptr));
#endif
}

// Give the blob fresh, not yet allocated memory of its capacity, forgetting any lent
// pointer (and the blob's values). Layers that shared the old memory (Split, Reshape)
// pick up the new one when the net next reshapes them, at the start of each forward.
void reset_data(FloatBlob& blob) {
  BlobInternals::data(blob).reset(
      new caffe::SyncedMemory(static_cast<size_t>(BlobInternals::capacity(blob)) * sizeof(float)));
}

// Where the newest copy of the blob's data is: "uninitialized", "cpu", "gpu" or "synced"
// (both, after a copy). Tests use it to prove that no host copy happened.
std::string data_head(FloatBlob& blob) {
  switch (blob.data()->head()) {
    case caffe::SyncedMemory::UNINITIALIZED: return "uninitialized";
    case caffe::SyncedMemory::HEAD_AT_CPU: return "cpu";
    case caffe::SyncedMemory::HEAD_AT_GPU: return "gpu";
    case caffe::SyncedMemory::SYNCED: return "synced";
  }
  return "unknown";
}

// Wait for everything Caffe queued on the legacy default stream.
void synchronize() {
#ifdef CPU_ONLY
  no_cuda("synchronize");
#else
  check(cudaStreamSynchronize(cudaStreamLegacy), "cudaStreamSynchronize");
#endif
}

// Blocking copies on the legacy default stream, so they are ordered after Caffe's kernels.
void copy_to_host(std::uintptr_t host, std::uintptr_t device, std::size_t nbytes) {
#ifdef CPU_ONLY
  no_cuda("copy_to_host");
#else
  check(cudaMemcpy(reinterpret_cast<void*>(host), reinterpret_cast<const void*>(device), nbytes,
                   cudaMemcpyDeviceToHost), "copy to host");
#endif
}

void copy_to_device(std::uintptr_t device, std::uintptr_t host, std::size_t nbytes) {
#ifdef CPU_ONLY
  no_cuda("copy_to_device");
#else
  check(cudaMemcpy(reinterpret_cast<void*>(device), reinterpret_cast<const void*>(host), nbytes,
                   cudaMemcpyHostToDevice), "copy to device");
#endif
}

// Device-to-device copy on the legacy default stream (so ordered after Caffe's kernels),
// blocking the host until done: engines that need fixed input addresses (CUDA graphs)
// take other engines' tensors this way.
void copy_on_device(std::uintptr_t destination, std::uintptr_t source, std::size_t nbytes) {
#ifdef CPU_ONLY
  no_cuda("copy_on_device");
#else
  check(cudaMemcpy(reinterpret_cast<void*>(destination), reinterpret_cast<const void*>(source), nbytes,
                   cudaMemcpyDeviceToDevice), "copy on device");
#endif
}

}  // namespace

BOOST_PYTHON_MODULE(hybrid_infer_native) {
  // Blob arguments are pycaffe Blob objects; Boost.Python finds the caffe::Blob<float>
  // registered by _caffe.so, so `import caffe` must come first.
  bp::def("built_against", &built_against);
  bp::def("cuda_enabled", &cuda_enabled);
  bp::def("device_count", &device_count);
  bp::def("device_name", &device_name);
  bp::def("current_device", &current_device);
  bp::def("cpu_data", &cpu_data);
  bp::def("mutable_cpu_data", &mutable_cpu_data);
  bp::def("gpu_data", &gpu_data);
  bp::def("mutable_gpu_data", &mutable_gpu_data);
  bp::def("set_gpu_data", &set_gpu_data);
  bp::def("reset_data", &reset_data);
  bp::def("data_head", &data_head);
  bp::def("synchronize", &synchronize);
  bp::def("copy_to_host", &copy_to_host);
  bp::def("copy_to_device", &copy_to_device);
  bp::def("copy_on_device", &copy_on_device);
}
