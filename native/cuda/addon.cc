// Node-API bindings of the "cuda" ComputeDevice (node_api.h directly, no npm dependency). Device memory is handed
// to JS as BigInt addresses; JS (shared/engine/cuda-device.ts) keeps the step-scoped pool and the views, and
// passes 0n for an absent optional buffer. Every call is synchronous from JS's point of view only where it
// must be: upload and download copy through the default stream (which orders them after every kernel before).
#include <cuda_runtime.h>
#include <node_api.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace {

using medfl_cuda::Geom;

struct Args {
  napi_env env;
  napi_value argv[16];
  size_t argc = 16;
  Args(napi_env e, napi_callback_info info, size_t want) : env(e) {
    if (napi_get_cb_info(e, info, &argc, argv, nullptr, nullptr) != napi_ok) throw std::runtime_error("bad call");
    if (argc < want) throw std::runtime_error("expected " + std::to_string(want) + " arguments, got " + std::to_string(argc));
  }
  template <class T = float>
  T* ptr(size_t i) const {
    uint64_t v = 0;
    bool lossless = false;
    if (napi_get_value_bigint_uint64(env, argv[i], &v, &lossless) != napi_ok) throw std::runtime_error("argument " + std::to_string(i) + " must be a BigInt device address");
    return reinterpret_cast<T*>(static_cast<uintptr_t>(v));
  }
  int64_t i64(size_t i) const {
    double d = 0;
    if (napi_get_value_double(env, argv[i], &d) != napi_ok) throw std::runtime_error("argument " + std::to_string(i) + " must be a number");
    return static_cast<int64_t>(d);
  }
  int i32(size_t i) const { return static_cast<int>(i64(i)); }
  double f64(size_t i) const {
    double d = 0;
    if (napi_get_value_double(env, argv[i], &d) != napi_ok) throw std::runtime_error("argument " + std::to_string(i) + " must be a number");
    return d;
  }
  bool flag(size_t i) const {
    bool b = false;
    if (napi_get_value_bool(env, argv[i], &b) != napi_ok) throw std::runtime_error("argument " + std::to_string(i) + " must be a boolean");
    return b;
  }
  // A typed array's data and byte length.
  void* host(size_t i, size_t* bytes) const {
    bool is = false;
    napi_is_typedarray(env, argv[i], &is);
    if (!is) throw std::runtime_error("argument " + std::to_string(i) + " must be a typed array");
    napi_typedarray_type type;
    size_t length = 0, offset = 0;
    void* data = nullptr;
    napi_value ab;
    napi_get_typedarray_info(env, argv[i], &type, &length, &data, &ab, &offset);
    const size_t el = type == napi_float64_array ? 8 : (type == napi_float32_array || type == napi_int32_array) ? 4 : 0;
    if (!el) throw std::runtime_error("argument " + std::to_string(i) + " must be a Float32Array, Int32Array or Float64Array");
    *bytes = length * el;
    return data;
  }
};

napi_value undefined(napi_env env) {
  napi_value u;
  napi_get_undefined(env, &u);
  return u;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <class F>
napi_value guarded(napi_env env, F f) {
  try {
    return f();
  } catch (const std::exception& e) {
    napi_throw_error(env, nullptr, (std::string("cuda: ") + e.what()).c_str());
    return nullptr;
  }
}

#define FN(name) napi_value name(napi_env env, napi_callback_info info)
#define BODY(want, ...) \
  return guarded(env, [&]() -> napi_value { Args a(env, info, want); __VA_ARGS__; return undefined(env); })

FN(Info) {
  return guarded(env, [&]() -> napi_value {
    int dev = 0, count = 0;
    check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (count < 1) throw std::runtime_error("no CUDA device");
    check(cudaGetDevice(&dev), "cudaGetDevice");
    cudaDeviceProp p;
    check(cudaGetDeviceProperties(&p, dev), "cudaGetDeviceProperties");
    int runtime = 0, driver = 0;
    cudaRuntimeGetVersion(&runtime);
    cudaDriverGetVersion(&driver);
    napi_value o, v;
    napi_create_object(env, &o);
    napi_create_string_utf8(env, p.name, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, o, "device", v);
    const std::string cc = std::to_string(p.major) + "." + std::to_string(p.minor);
    napi_create_string_utf8(env, cc.c_str(), NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, o, "computeCapability", v);
    napi_create_double(env, static_cast<double>(p.totalGlobalMem), &v);
    napi_set_named_property(env, o, "memoryBytes", v);
    const std::string dnn = medfl_cuda::cudnn_version();
    napi_create_string_utf8(env, dnn.c_str(), NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, o, "cudnn", v);
    napi_create_int32(env, runtime, &v);
    napi_set_named_property(env, o, "cudaRuntime", v);
    napi_create_int32(env, driver, &v);
    napi_set_named_property(env, o, "cudaDriver", v);
    return o;
  });
}

FN(SetTf32) { BODY(1, medfl_cuda::set_tf32(a.flag(0))); }

FN(Malloc) {
  return guarded(env, [&]() -> napi_value {
    Args a(env, info, 1);
    void* p = nullptr;
    const int64_t bytes = a.i64(0);
    check(cudaMalloc(&p, bytes > 0 ? bytes : 4), "cudaMalloc");
    napi_value v;
    napi_create_bigint_uint64(env, reinterpret_cast<uintptr_t>(p), &v);
    return v;
  });
}
FN(Free) { BODY(1, check(cudaFree(a.ptr<void>(0)), "cudaFree")); }
FN(Upload) {
  BODY(2, size_t bytes = 0; void* src = a.host(1, &bytes); check(cudaMemcpy(a.ptr<void>(0), src, bytes, cudaMemcpyHostToDevice), "upload"));
}
FN(Download) {
  BODY(2, size_t bytes = 0; void* dst = a.host(1, &bytes); check(cudaMemcpy(dst, a.ptr<void>(0), bytes, cudaMemcpyDeviceToHost), "download"));
}
FN(Synchronize) { BODY(0, check(cudaDeviceSynchronize(), "cudaDeviceSynchronize")); }
FN(Fill) { BODY(3, medfl_cuda::fill(a.ptr(0), a.i64(1), static_cast<float>(a.f64(2)))); }
FN(Copy) { BODY(3, medfl_cuda::copy(a.ptr(0), a.ptr(1), a.i64(2))); }

FN(Conv) {
  BODY(5, {
    size_t bytes = 0;
    const int* raw = static_cast<const int*>(a.host(1, &bytes));
    if (bytes != Geom::kLen * sizeof(int)) throw std::runtime_error("geometry must hold 21 integers");
    Geom g;
    std::memcpy(g.raw, raw, sizeof(g.raw));
    medfl_cuda::conv(a.i32(0), g, a.ptr(2), a.ptr(3), a.ptr(4));
  });
}
// (x, nv, C, gamma, beta, runMean, runVar, momentum, eps, relu, y, mean, invStd)
FN(BnTrain) {
  BODY(13, medfl_cuda::bn_train(a.ptr(0), a.i64(1), a.i32(2), a.ptr(3), a.ptr(4), a.ptr(5), a.ptr(6), static_cast<float>(a.f64(7)), static_cast<float>(a.f64(8)),
                                a.flag(9), a.ptr(10), a.ptr(11), a.ptr(12)));
}
// (x, nv, C, gamma, beta, runMean, runVar, eps, relu, y, mean, invStd)
FN(BnEval) {
  BODY(12, medfl_cuda::bn_eval(a.ptr(0), a.i64(1), a.i32(2), a.ptr(3), a.ptr(4), a.ptr(5), a.ptr(6), static_cast<float>(a.f64(7)), a.flag(8), a.ptr(9), a.ptr(10),
                               a.ptr(11)));
}
// (x, dy, nv, C, mean, invStd, gamma, y|0n, batchStats, dx|0n, gg|0n, gb|0n)
FN(BnBackward) {
  BODY(12, medfl_cuda::bn_backward(a.ptr(0), a.ptr(1), a.i64(2), a.i32(3), a.ptr(4), a.ptr(5), a.ptr(6), a.ptr(7), a.flag(8), a.ptr(9), a.ptr(10), a.ptr(11)));
}
// (x, n, V, C, G, gamma, beta, eps, relu, y, stats)
FN(GnForward) {
  BODY(11, medfl_cuda::gn_forward(a.ptr(0), a.i32(1), a.i64(2), a.i32(3), a.i32(4), a.ptr(5), a.ptr(6), static_cast<float>(a.f64(7)), a.flag(8), a.ptr(9),
                                  a.ptr<double>(10)));
}
// (x, dy, n, V, C, G, stats, gamma, reluOut|0n, dx|0n, gg|0n, gb|0n)
FN(GnBackward) {
  BODY(12, medfl_cuda::gn_backward(a.ptr(0), a.ptr(1), a.i32(2), a.i64(3), a.i32(4), a.i32(5), a.ptr<double>(6), a.ptr(7), a.ptr(8), a.ptr(9), a.ptr(10),
                                   a.ptr(11)));
}
FN(Relu) { BODY(3, medfl_cuda::relu(a.ptr(0), a.ptr(1), a.i64(2))); }
FN(ReluBackward) { BODY(4, medfl_cuda::relu_backward(a.ptr(0), a.ptr(1), a.ptr(2), a.i64(3))); }
FN(Add) { BODY(5, medfl_cuda::add(a.ptr(0), a.ptr(1), a.ptr(2), a.i64(3), a.flag(4))); }
FN(AddInto) { BODY(3, medfl_cuda::add_into(a.ptr(0), a.ptr(1), a.i64(2))); }
// (x, n, D, H, W, C, y, argmax)
FN(MaxPool) { BODY(8, medfl_cuda::max_pool(a.ptr(0), a.i32(1), a.i32(2), a.i32(3), a.i32(4), a.i32(5), a.ptr(6), a.ptr<int>(7))); }
// (dy, argmax, n, D, H, W, C, dx)
FN(MaxPoolBackward) { BODY(8, medfl_cuda::max_pool_backward(a.ptr(0), a.ptr<int>(1), a.i32(2), a.i32(3), a.i32(4), a.i32(5), a.i32(6), a.ptr(7))); }
FN(Concat) { BODY(6, medfl_cuda::concat(a.ptr(0), a.i32(1), a.ptr(2), a.i32(3), a.ptr(4), a.i64(5))); }
FN(Split) { BODY(6, medfl_cuda::split(a.ptr(0), a.i32(1), a.i32(2), a.ptr(3), a.ptr(4), a.i64(5))); }
FN(BiasAdd) { BODY(4, medfl_cuda::bias_add(a.ptr(0), a.i64(1), a.i32(2), a.ptr(3))); }
FN(BiasGradAdd) { BODY(4, medfl_cuda::bias_grad_add(a.ptr(0), a.ptr(1), a.i64(2), a.i32(3))); }
// (x, n, D, H, W, C, outC, stride, y)
FN(ShortcutA) { BODY(9, medfl_cuda::shortcut_a(a.ptr(0), a.i32(1), a.i32(2), a.i32(3), a.i32(4), a.i32(5), a.i32(6), a.i32(7), a.ptr(8))); }
FN(ShortcutABackward) {
  BODY(9, medfl_cuda::shortcut_a_backward(a.ptr(0), a.i32(1), a.i32(2), a.i32(3), a.i32(4), a.i32(5), a.i32(6), a.i32(7), a.ptr(8)));
}
// (z, target, weight|0n, voxels, K, smooth, loss, grad)
FN(SegLoss) { BODY(8, medfl_cuda::segmentation_loss(a.ptr(0), a.ptr(1), a.ptr(2), a.i64(3), a.i32(4), a.f64(5), a.ptr(6), a.ptr(7))); }
// (w, g, m, v, n, stepSize, beta1, beta2, eps, sqrtC2, wd)
FN(Adam) { BODY(11, medfl_cuda::adam(a.ptr(0), a.ptr(1), a.ptr(2), a.ptr(3), a.i64(4), a.f64(5), a.f64(6), a.f64(7), a.f64(8), a.f64(9), a.f64(10))); }
// (w, g, buf, n, lr, momentum, wd, first)
FN(Sgd) { BODY(8, medfl_cuda::sgd(a.ptr(0), a.ptr(1), a.ptr(2), a.i64(3), a.f64(4), a.f64(5), a.f64(6), a.flag(7))); }

napi_value Init(napi_env env, napi_value exports) {
  const struct {
    const char* name;
    napi_callback fn;
  } fns[] = {{"info", Info},
             {"setTf32", SetTf32},
             {"malloc", Malloc},
             {"free", Free},
             {"upload", Upload},
             {"download", Download},
             {"synchronize", Synchronize},
             {"fill", Fill},
             {"copy", Copy},
             {"conv", Conv},
             {"bnTrain", BnTrain},
             {"bnEval", BnEval},
             {"bnBackward", BnBackward},
             {"gnForward", GnForward},
             {"gnBackward", GnBackward},
             {"relu", Relu},
             {"reluBackward", ReluBackward},
             {"add", Add},
             {"addInto", AddInto},
             {"maxPool", MaxPool},
             {"maxPoolBackward", MaxPoolBackward},
             {"concat", Concat},
             {"split", Split},
             {"biasAdd", BiasAdd},
             {"biasGradAdd", BiasGradAdd},
             {"shortcutA", ShortcutA},
             {"shortcutABackward", ShortcutABackward},
             {"segLoss", SegLoss},
             {"adam", Adam},
             {"sgd", Sgd}};
  for (const auto& f : fns) {
    napi_value v;
    napi_create_function(env, f.name, NAPI_AUTO_LENGTH, f.fn, nullptr, &v);
    napi_set_named_property(env, exports, f.name, v);
  }
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
