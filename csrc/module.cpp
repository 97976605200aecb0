// fastclip._C: the pybind11 module. Each op file (csrc/<op>.cpp) contributes a bind_<op>() function.
//
// The kernels take raw buffers: data pointers (as integers), sizes and element strides, checked on the
// Python side (fastclip/backends/cpu/__init__.py). No torch headers or libraries are needed to build this.
#include <pybind11/pybind11.h>

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "activation.h"
#include "common.h"

namespace py = pybind11;

namespace fastclip {

void bind_attention(py::module_& m);
void bind_layer_norm(py::module_& m);
void bind_bias_act(py::module_& m);
void bind_normalize_project(py::module_& m);
void bind_linear(py::module_& m);
void bind_linear_int8(py::module_& m);
void bind_peak(py::module_& m);
void bind_rotary(py::module_& m);
void bind_encoder_block(py::module_& m);

namespace {

bool has_entry_points(void* handle, OmpRuntime* rt) {
  rt->parallel = reinterpret_cast<decltype(rt->parallel)>(dlsym(handle, "GOMP_parallel"));
  rt->thread_num = reinterpret_cast<int (*)()>(dlsym(handle, "omp_get_thread_num"));
  rt->team_size = reinterpret_cast<int (*)()>(dlsym(handle, "omp_get_num_threads"));
  rt->max_threads = reinterpret_cast<int (*)()>(dlsym(handle, "omp_get_max_threads"));
  rt->in_parallel = reinterpret_cast<int (*)()>(dlsym(handle, "omp_in_parallel"));
  Dl_info info;
  if (rt->parallel && rt->thread_num && rt->team_size && rt->max_threads && rt->in_parallel &&
      dladdr(reinterpret_cast<void*>(rt->parallel), &info) && info.dli_fname) {
    rt->path = info.dli_fname;  // the runtime's own file; stays valid, it is never unloaded
    return true;
  }
  *rt = OmpRuntime{};
  return false;
}

const char* basename_of(const char* name) {
  const char* base = std::strrchr(name, '/');
  return base ? base + 1 : name;
}

// dl_iterate_phdr callbacks. torch's: look the entry points up in libtorch_cpu's own dependency scope,
// which resolves them to exactly the OpenMP runtime torch's kernels call (other wheels may bundle
// further copies of libgomp under other names, e.g. sentencepiece). any: the first loaded runtime.
int find_torch_openmp(struct dl_phdr_info* info, size_t, void* data) {
  const char* name = info->dlpi_name;
  if (!name || std::strncmp(basename_of(name), "libtorch_cpu", 12) != 0) return 0;
  void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);  // already loaded: only a reference, no new copy
  return handle && has_entry_points(handle, static_cast<OmpRuntime*>(data)) ? 1 : 0;
}

int find_any_openmp(struct dl_phdr_info* info, size_t, void* data) {
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* base = basename_of(name);
  if (!std::strstr(base, "libgomp") && !std::strstr(base, "libiomp") && !std::strstr(base, "libomp")) return 0;
  void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
  return handle && has_entry_points(handle, static_cast<OmpRuntime*>(data)) ? 1 : 0;
}

std::string omp_runtime_path() {
  const OmpRuntime* rt = omp_runtime();
  return rt ? std::string(rt->path) : std::string();
}

// Team size of a parallel region opened the way the kernels open theirs (1 without a runtime).
int team_size() {
  const OmpRuntime* rt = omp_runtime();
  if (!rt) return 1;
  std::atomic<int> size{0};
  rt->parallel([](void* p) { static_cast<std::atomic<int>*>(p)->store(omp_runtime()->team_size()); }, &size,
               static_cast<unsigned>(max_threads()), 0);
  return size.load();
}

}  // namespace

const OmpRuntime* omp_runtime() {
  // torch's runtime, found once and kept. Before torch is loaded: the first OpenMP runtime in the
  // process, if any, looked up again on every call (so torch's is picked as soon as it is loaded).
  static OmpRuntime torch_rt, other_rt;
  static std::atomic<bool> ready{false};
  static std::mutex lock;
  if (ready.load(std::memory_order_acquire)) return &torch_rt;
  std::lock_guard<std::mutex> guard(lock);
  if (ready.load(std::memory_order_relaxed)) return &torch_rt;
  OmpRuntime rt;
  if (dl_iterate_phdr(find_torch_openmp, &rt)) {
    torch_rt = rt;
    ready.store(true, std::memory_order_release);
    return &torch_rt;
  }
  if (dl_iterate_phdr(find_any_openmp, &rt)) {
    other_rt = rt;
    return &other_rt;
  }
  return nullptr;
}

namespace {
std::atomic<bool> avx512_off{false};
}  // namespace

py::dict activation_codes() {
  py::dict codes;
  for (int i = 0; i < kNumActs; ++i) codes[kActNames[i]] = i;
  return codes;
}

// FASTCLIP_DISABLE_AVX512=1 (read once, at the first call) makes an AVX-512 CPU run as an AVX2 one:
// the AVX2 attention tiles and the AVX2 packed linear kernel. With the libraries' own switches it lets one
// machine run the whole test suite as an AVX2-only CPU would (.ci/emulate-avx2).
bool avx512_disabled_by_env() {
  const char* v = std::getenv("FASTCLIP_DISABLE_AVX512");
  return v && *v && std::strcmp(v, "0") != 0;
}

bool avx512_present() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           !avx512_disabled_by_env();
  }();
  return has;
}

bool avx512_enabled() { return avx512_present() && !avx512_off.load(std::memory_order_relaxed); }

bool set_avx512(bool on) {
  const bool was = avx512_enabled();
  avx512_off.store(!on, std::memory_order_relaxed);
  return was;
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // namespace fastclip

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclip C++ CPU kernels (fp32, AVX2/FMA) on raw buffers; call them through fastclip.backends.cpu";
  m.def("cpu_supported", &fastclip::cpu_supported, "True if this CPU has AVX2 and FMA (the kernels need both).");
  m.def("set_avx512", &fastclip::set_avx512, py::arg("on"),
        "set_avx512(on) -> previous: let kernels with an AVX2 and an AVX-512 variant (attention, linear) use AVX-512 "
        "where the CPU has it (on, the default) or always AVX2 (off, for tests).");
  m.def("num_threads", &fastclip::max_threads, "Threads a parallel kernel uses now (torch's OpenMP pool).");
  m.def("team_size", &fastclip::team_size, "Threads in a parallel region of the kernels (a check of the pool).");
  m.def("openmp_runtime", &fastclip::omp_runtime_path,
        "Path of the OpenMP runtime whose pool the kernels use ('' if none is loaded: kernels run serially).");
  m.def("avx512_present", &fastclip::avx512_present,
        "True if the CPU has AVX-512F (with AVX2 and FMA) and FASTCLIP_DISABLE_AVX512 is not set.");
  m.def("activation_codes", &fastclip::activation_codes,
        "{activation name: code} of the activations the kernels implement (bias_act, linear's epilogue).");
  fastclip::bind_attention(m);
  fastclip::bind_layer_norm(m);
  fastclip::bind_bias_act(m);
  fastclip::bind_normalize_project(m);
  fastclip::bind_linear(m);
  fastclip::bind_linear_int8(m);
  fastclip::bind_peak(m);
  fastclip::bind_rotary(m);
  fastclip::bind_encoder_block(m);
}
