// Node-API bindings for the oneDNN convolution engine (see conv.h). Synchronous; one engine and one
// primitive cache per Node environment (main thread or worker), kept as the addon's instance data.
#include <node_api.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "conv.h"
#include "elementwise.h"
#include "fold.h"
#include "loss.h"
#include "norm.h"
#include "robust.h"
#include "gaussian.h"
#include "window_blend.h"

namespace {

using medfl::Geom;
using medfl::Layout;
using medfl::Op;

struct Instance {
  medfl::ConvEngine engine;
};

#define CALL(env, expr)                                                  \
  do {                                                                   \
    if ((expr) != napi_ok) {                                             \
      const napi_extended_error_info* info_ = nullptr;                   \
      napi_get_last_error_info((env), &info_);                           \
      bool pending_ = false;                                             \
      napi_is_exception_pending((env), &pending_);                       \
      if (!pending_)                                                     \
        napi_throw_error((env), nullptr,                                 \
                         info_ && info_->error_message ? info_->error_message : "Node-API call failed"); \
      return nullptr;                                                    \
    }                                                                    \
  } while (0)

napi_value throw_error(napi_env env, const std::string& msg) {
  napi_throw_error(env, nullptr, msg.c_str());
  return nullptr;
}

Instance* instance(napi_env env) {
  void* data = nullptr;
  napi_get_instance_data(env, &data);
  return static_cast<Instance*>(data);
}

// Reads a Float32Array (or Int32Array) argument; returns false (exception set) on a type mismatch.
bool typed(napi_env env, napi_value v, napi_typedarray_type want, void** data, size_t* length, const char* what) {
  bool is = false;
  napi_is_typedarray(env, v, &is);
  napi_typedarray_type type;
  napi_value ab;
  size_t offset;
  if (!is || napi_get_typedarray_info(env, v, &type, length, data, &ab, &offset) != napi_ok || type != want) {
    throw_error(env, std::string(what) + (want == napi_float32_array   ? " must be a Float32Array"
                                          : want == napi_float64_array ? " must be a Float64Array"
                                          : want == napi_uint32_array  ? " must be a Uint32Array"
                                                                       : " must be an Int32Array"));
    return false;
  }
  return true;
}

bool read_int(napi_env env, napi_value v, int32_t* out, const char* what) {
  if (napi_get_value_int32(env, v, out) != napi_ok) {
    throw_error(env, std::string(what) + " must be a number");
    return false;
  }
  return true;
}

bool read_geom(napi_env env, napi_value v, Geom* g) {
  void* data;
  size_t len;
  if (!typed(env, v, napi_int32_array, &data, &len, "geometry")) return false;
  if (len != medfl::kGeomLen) {
    throw_error(env, "geometry must hold " + std::to_string(medfl::kGeomLen) + " integers");
    return false;
  }
  const int32_t* p = static_cast<const int32_t*>(data);
  for (int i = 0; i < medfl::kGeomLen; ++i) (*g)[i] = p[i];
  return true;
}

void free_buffer(napi_env env, void* data, void* hint) {
  int64_t adjusted = 0;
  napi_adjust_external_memory(env, -static_cast<int64_t>(reinterpret_cast<uintptr_t>(hint)), &adjusted);
  std::free(data);
}

// run(op, layout, geom: Int32Array, a: Float32Array, b: Float32Array, out?: Float32Array): Float32Array
// Forward: a = x, b = w, out = y. BackwardData: a = dy, b = w, out = dx. BackwardFilter: a = x, b = dy, out = dw.
// Without `out` the result is a new Float32Array over memory the addon allocated (an external ArrayBuffer).
napi_value Run(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  if (argc < 5) return throw_error(env, "run(op, layout, geom, a, b, out?) takes at least 5 arguments");
  int32_t op_i, layout_i;
  Geom g;
  if (!read_int(env, argv[0], &op_i, "op") || !read_int(env, argv[1], &layout_i, "layout") || !read_geom(env, argv[2], &g))
    return nullptr;
  if (op_i < 0 || op_i > 2) return throw_error(env, "op must be 0 (forward), 1 (backward data) or 2 (backward filter)");
  if (layout_i < 0 || layout_i > 3) return throw_error(env, "layout must be 0 (plain), 1 (any weights), 2 (any) or 3 (ncsp)");
  const Op op = static_cast<Op>(op_i);
  const size_t x_len = static_cast<size_t>(g[0] * g[1] * g[2] * g[3] * g[4]);
  const size_t w_len = static_cast<size_t>(g[6] * g[7] * g[8] * g[4] * g[5]);
  const size_t y_len = static_cast<size_t>(g[0] * g[21] * g[22] * g[23] * g[5]);
  size_t want_a, want_b, want_out;
  const char *name_a, *name_b;
  switch (op) {
    case Op::Forward: want_a = x_len, want_b = w_len, want_out = y_len, name_a = "x", name_b = "w"; break;
    case Op::BackwardData: want_a = y_len, want_b = w_len, want_out = x_len, name_a = "dy", name_b = "w"; break;
    default: want_a = x_len, want_b = y_len, want_out = w_len, name_a = "x", name_b = "dy"; break;
  }
  void *a, *b, *out = nullptr;
  size_t len_a, len_b, len_out = 0;
  if (!typed(env, argv[3], napi_float32_array, &a, &len_a, name_a) || !typed(env, argv[4], napi_float32_array, &b, &len_b, name_b))
    return nullptr;
  if (len_a != want_a) return throw_error(env, std::string(name_a) + " has " + std::to_string(len_a) + " elements, the geometry needs " + std::to_string(want_a));
  if (len_b != want_b) return throw_error(env, std::string(name_b) + " has " + std::to_string(len_b) + " elements, the geometry needs " + std::to_string(want_b));
  napi_value result = nullptr;
  napi_valuetype out_type = napi_undefined;
  if (argc >= 6) napi_typeof(env, argv[5], &out_type);
  if (out_type != napi_undefined && out_type != napi_null) {
    if (!typed(env, argv[5], napi_float32_array, &out, &len_out, "out")) return nullptr;
    if (len_out != want_out) return throw_error(env, "out has " + std::to_string(len_out) + " elements, the geometry needs " + std::to_string(want_out));
    result = argv[5];
  }
  Instance* inst = instance(env);
  if (!inst) return throw_error(env, "oneDNN addon: no instance data");
  void* owned = nullptr;
  const size_t bytes = want_out * sizeof(float);
  if (!out) {
    owned = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!owned) return throw_error(env, "oneDNN addon: out of memory (" + std::to_string(bytes) + " bytes)");
    out = owned;
  }
  try {
    inst->engine.run(op, static_cast<Layout>(layout_i), g, {a, b, out});
  } catch (const dnnl::error& e) {
    std::free(owned);
    return throw_error(env, std::string("oneDNN: ") + e.what() + " (status " + std::to_string(static_cast<int>(e.status)) + ")");
  } catch (const std::exception& e) {
    std::free(owned);
    return throw_error(env, e.what());
  }
  if (owned) {
    napi_value ab;
    if (napi_create_external_arraybuffer(env, owned, bytes, free_buffer, reinterpret_cast<void*>(static_cast<uintptr_t>(bytes)), &ab) != napi_ok) {
      std::free(owned);
      return throw_error(env, "oneDNN addon: could not create an external ArrayBuffer");
    }
    int64_t adjusted = 0;
    napi_adjust_external_memory(env, static_cast<int64_t>(bytes), &adjusted);
    CALL(env, napi_create_typedarray(env, napi_float32_array, want_out, ab, 0, &result));
  }
  return result;
}

// impl(op, layout, geom): the implementation oneDNN chose, e.g. "jit:avx512_core" (+ reorders).
napi_value Impl(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  int32_t op_i, layout_i;
  Geom g;
  if (argc < 3 || !read_int(env, argv[0], &op_i, "op") || !read_int(env, argv[1], &layout_i, "layout") || !read_geom(env, argv[2], &g))
    return nullptr;
  if (op_i < 0 || op_i > 2 || layout_i < 0 || layout_i > 3) return throw_error(env, "bad op or layout");
  std::string s;
  try {
    s = instance(env)->engine.impl(static_cast<Op>(op_i), static_cast<Layout>(layout_i), g);
  } catch (const dnnl::error& e) {
    return throw_error(env, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return throw_error(env, e.what());
  }
  napi_value r;
  CALL(env, napi_create_string_utf8(env, s.c_str(), s.size(), &r));
  return r;
}

// drop(op, layout, geom): forgets that cached plan (after the auto layout chose another one).
napi_value Drop(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  int32_t op_i, layout_i;
  Geom g;
  if (argc < 3 || !read_int(env, argv[0], &op_i, "op") || !read_int(env, argv[1], &layout_i, "layout") || !read_geom(env, argv[2], &g))
    return nullptr;
  if (op_i < 0 || op_i > 2 || layout_i < 0 || layout_i > 3) return throw_error(env, "bad op or layout");
  napi_value r;
  CALL(env, napi_get_boolean(env, instance(env)->engine.drop(static_cast<Op>(op_i), static_cast<Layout>(layout_i), g), &r));
  return r;
}

napi_value SetThreads(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CALL(env, napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr));
  int32_t n;
  if (argc < 1 || !read_int(env, argv[0], &n, "threads")) return nullptr;
  if (n < 1) return throw_error(env, "threads must be >= 1");
  omp_set_num_threads(n);
  return nullptr;
}

napi_value Info(napi_env env, napi_callback_info info) {
  napi_value obj, v;
  CALL(env, napi_create_object(env, &obj));
  const dnnl_version_t* ver = dnnl_version();
  const std::string version = std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." + std::to_string(ver->patch);
  CALL(env, napi_create_string_utf8(env, version.c_str(), version.size(), &v));
  CALL(env, napi_set_named_property(env, obj, "version", v));
  const char* cpu_runtime = ver->cpu_runtime == DNNL_RUNTIME_OMP ? "omp" : ver->cpu_runtime == DNNL_RUNTIME_SEQ ? "seq" : "other";
  CALL(env, napi_create_string_utf8(env, cpu_runtime, NAPI_AUTO_LENGTH, &v));
  CALL(env, napi_set_named_property(env, obj, "runtime", v));
  const int isa = static_cast<int>(dnnl::get_effective_cpu_isa());
  const char* isa_name = isa == static_cast<int>(dnnl::cpu_isa::avx512_core_amx) ? "avx512_core_amx"
                         : isa == static_cast<int>(dnnl::cpu_isa::avx512_core_bf16) ? "avx512_core_bf16"
                         : isa == static_cast<int>(dnnl::cpu_isa::avx512_core_vnni) ? "avx512_core_vnni"
                         : isa == static_cast<int>(dnnl::cpu_isa::avx512_core) ? "avx512_core"
                         : isa == static_cast<int>(dnnl::cpu_isa::avx2_vnni) ? "avx2_vnni"
                         : isa == static_cast<int>(dnnl::cpu_isa::avx2) ? "avx2"
                         : isa == static_cast<int>(dnnl::cpu_isa::avx) ? "avx"
                         : "other";
  CALL(env, napi_create_string_utf8(env, isa_name, NAPI_AUTO_LENGTH, &v));
  CALL(env, napi_set_named_property(env, obj, "isa", v));
  CALL(env, napi_create_int32(env, omp_get_max_threads(), &v));
  CALL(env, napi_set_named_property(env, obj, "threads", v));
  CALL(env, napi_create_int32(env, omp_get_num_procs(), &v));
  CALL(env, napi_set_named_property(env, obj, "procs", v));
  Instance* inst = instance(env);
  CALL(env, napi_create_uint32(env, inst ? static_cast<uint32_t>(inst->engine.cached()) : 0, &v));
  CALL(env, napi_set_named_property(env, obj, "cachedPrimitives", v));
  return obj;
}

napi_value ClearCache(napi_env env, napi_callback_info info) {
  Instance* inst = instance(env);
  if (inst) inst->engine.clear();
  return nullptr;
}

// ---- elementwise ops (elementwise.h): every array is the caller's; outputs are preallocated by JS. ----

// Reads arguments in order; the first failure sets a JS exception and makes ok() false.
class Args {
 public:
  Args(napi_env env, napi_callback_info info, size_t want, const char* fn) : env_(env), fn_(fn) {
    argc_ = 16;
    if (napi_get_cb_info(env, info, &argc_, argv_, nullptr, nullptr) != napi_ok || argc_ < want) fail("wrong number of arguments");
  }
  bool ok() const { return ok_; }
  napi_value arg(size_t i) const { return argv_[i]; }
  napi_env env() const { return env_; }
  float* f32(size_t i, const char* what, size_t want, bool nullable = false) {
    return static_cast<float*>(array(i, what, want, napi_float32_array, nullable, sizeof(float)));
  }
  double* f64(size_t i, const char* what, size_t want, bool nullable = false) {
    return static_cast<double*>(array(i, what, want, napi_float64_array, nullable, sizeof(double)));
  }
  uint32_t* u32(size_t i, const char* what, size_t want) {
    return static_cast<uint32_t*>(array(i, what, want, napi_uint32_array, false, sizeof(uint32_t)));
  }
  int32_t* i32(size_t i, const char* what, size_t want) {
    return static_cast<int32_t*>(array(i, what, want, napi_int32_array, false, sizeof(int32_t)));
  }
  // Length of a Float32Array argument (0 after a failure).
  size_t length(size_t i, const char* what) {
    if (!ok_) return 0;
    size_t len = 0;
    void* data;
    if (!typed(env_, argv_[i], napi_float32_array, &data, &len, what)) ok_ = false;
    return len;
  }
  int64_t integer(size_t i, const char* what, int64_t min) {
    if (!ok_) return 0;
    int64_t v = 0;
    if (napi_get_value_int64(env_, argv_[i], &v) != napi_ok || v < min) fail(std::string(what) + " must be an integer >= " + std::to_string(min));
    return v;
  }
  double number(size_t i, const char* what) {
    if (!ok_) return 0;
    double v = 0;
    if (napi_get_value_double(env_, argv_[i], &v) != napi_ok) fail(std::string(what) + " must be a number");
    return v;
  }
  bool flag(size_t i) {
    if (!ok_) return false;
    bool v = false;
    napi_get_value_bool(env_, argv_[i], &v);
    return v;
  }
  void fail(const std::string& msg) {
    if (!ok_) return;
    ok_ = false;
    throw_error(env_, std::string(fn_) + ": " + msg);
  }

 private:
  void* array(size_t i, const char* what, size_t want, napi_typedarray_type type, bool nullable, size_t) {
    if (!ok_) return nullptr;
    napi_valuetype vt = napi_undefined;
    napi_typeof(env_, argv_[i], &vt);
    if (nullable && (vt == napi_undefined || vt == napi_null)) return nullptr;
    void* data = nullptr;
    size_t len = 0;
    if (!typed(env_, argv_[i], type, &data, &len, what)) {
      ok_ = false;
      return nullptr;
    }
    if (len != want) {
      fail(std::string(what) + " has " + std::to_string(len) + " elements, expected " + std::to_string(want));
      return nullptr;
    }
    return data;
  }
  napi_env env_;
  const char* fn_;
  size_t argc_;
  napi_value argv_[16];
  bool ok_ = true;
};

// bnStats(x, C, momentum, eps, mean, invstd, runMean, runVar)
napi_value BnStats(napi_env env, napi_callback_info info) {
  Args a(env, info, 8, "bnStats");
  const size_t n = a.length(0, "x");
  const int64_t C = a.integer(1, "C", 1);
  if (a.ok() && (n == 0 || n % C)) a.fail("x must hold a positive whole number of voxels");
  const float* x = a.f32(0, "x", n);
  const double momentum = a.number(2, "momentum"), eps = a.number(3, "eps");
  float* mean = a.f32(4, "mean", C);
  float* invstd = a.f32(5, "invstd", C);
  float* rm = a.f32(6, "runMean", C);
  float* rv = a.f32(7, "runVar", C);
  if (!a.ok()) return nullptr;
  medfl::bn_stats(x, n / C, C, momentum, eps, mean, invstd, rm, rv);
  return nullptr;
}

// scaleShift(x, C, scale, shift, relu, y)
napi_value ScaleShift(napi_env env, napi_callback_info info) {
  Args a(env, info, 6, "scaleShift");
  const size_t n = a.length(0, "x");
  const int64_t C = a.integer(1, "C", 1);
  if (a.ok() && n % C) a.fail("x must hold a whole number of voxels");
  const float* x = a.f32(0, "x", n);
  const float* scale = a.f32(2, "scale", C);
  const float* shift = a.f32(3, "shift", C);
  const bool relu = a.flag(4);
  float* y = a.f32(5, "y", n);
  if (!a.ok()) return nullptr;
  medfl::scale_shift(x, n / C, C, scale, shift, relu, y);
  return nullptr;
}

// bnBackward(x, dy, C, mean, invstd, gamma, y|null, batchStats, dgamma, dbeta, dx|null)
napi_value BnBackward(napi_env env, napi_callback_info info) {
  Args a(env, info, 11, "bnBackward");
  const size_t n = a.length(0, "x");
  const int64_t C = a.integer(2, "C", 1);
  if (a.ok() && (n == 0 || n % C)) a.fail("x must hold a positive whole number of voxels");
  const float* x = a.f32(0, "x", n);
  const float* dy = a.f32(1, "dy", n);
  const float* mean = a.f32(3, "mean", C);
  const float* invstd = a.f32(4, "invstd", C);
  const float* gamma = a.f32(5, "gamma", C);
  const float* y = a.f32(6, "y", n, true);
  const bool batch_stats = a.flag(7);
  float* dgamma = a.f32(8, "dgamma", C);
  float* dbeta = a.f32(9, "dbeta", C);
  float* dx = a.f32(10, "dx", n, true);
  if (!a.ok()) return nullptr;
  medfl::bn_backward(x, dy, n / C, C, mean, invstd, gamma, y, batch_stats, dgamma, dbeta, dx);
  return nullptr;
}

// relu(x, y) · reluBackward(y, dy, dx) · add(a, b, relu, y) · addInto(dst, src)
napi_value Relu(napi_env env, napi_callback_info info) {
  Args a(env, info, 2, "relu");
  const size_t n = a.length(0, "x");
  const float* x = a.f32(0, "x", n);
  float* y = a.f32(1, "y", n);
  if (!a.ok()) return nullptr;
  medfl::relu(x, n, y);
  return nullptr;
}

napi_value ReluBackward(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "reluBackward");
  const size_t n = a.length(0, "y");
  const float* y = a.f32(0, "y", n);
  const float* dy = a.f32(1, "dy", n);
  float* dx = a.f32(2, "dx", n);
  if (!a.ok()) return nullptr;
  medfl::relu_backward(y, dy, n, dx);
  return nullptr;
}

napi_value Add(napi_env env, napi_callback_info info) {
  Args a(env, info, 4, "add");
  const size_t n = a.length(0, "a");
  const float* x = a.f32(0, "a", n);
  const float* z = a.f32(1, "b", n);
  const bool relu = a.flag(2);
  float* y = a.f32(3, "y", n);
  if (!a.ok()) return nullptr;
  medfl::add(x, z, n, relu, y);
  return nullptr;
}

napi_value AddInto(napi_env env, napi_callback_info info) {
  Args a(env, info, 2, "addInto");
  const size_t n = a.length(0, "dst");
  float* dst = a.f32(0, "dst", n);
  const float* src = a.f32(1, "src", n);
  if (!a.ok()) return nullptr;
  medfl::add_into(dst, src, n);
  return nullptr;
}

// adamStep(w, g, m, v, stepSize, beta1, beta2, eps, sqrtC2, weightDecay): w, m, v updated in place.
napi_value AdamStep(napi_env env, napi_callback_info info) {
  Args a(env, info, 10, "adamStep");
  const size_t n = a.length(0, "w");
  float* w = a.f32(0, "w", n);
  const float* g = a.f32(1, "g", n);
  float* m = a.f32(2, "m", n);
  float* v = a.f32(3, "v", n);
  const double ss = a.number(4, "stepSize"), b1 = a.number(5, "beta1"), b2 = a.number(6, "beta2"), eps = a.number(7, "eps"),
               sc2 = a.number(8, "sqrtC2"), wd = a.number(9, "weightDecay");
  if (!a.ok()) return nullptr;
  medfl::adam_step(w, g, m, v, int64_t(n), ss, b1, b2, eps, sc2, wd);
  return nullptr;
}

// sgdStep(w, g, buf, lr, momentum, weightDecay, first): w and buf updated in place.
napi_value SgdStep(napi_env env, napi_callback_info info) {
  Args a(env, info, 7, "sgdStep");
  const size_t n = a.length(0, "w");
  float* w = a.f32(0, "w", n);
  const float* g = a.f32(1, "g", n);
  float* buf = a.f32(2, "buf", n);
  const double lr = a.number(3, "lr"), mo = a.number(4, "momentum"), wd = a.number(5, "weightDecay");
  const bool first = a.number(6, "first") != 0;
  if (!a.ok()) return nullptr;
  medfl::sgd_step(w, g, buf, int64_t(n), lr, mo, wd, first);
  return nullptr;
}

// maxPool(x, n, D, H, W, C, y, argmax)
napi_value MaxPool(napi_env env, napi_callback_info info) {
  Args a(env, info, 8, "maxPool");
  const int64_t n = a.integer(1, "n", 1), D = a.integer(2, "D", 1), H = a.integer(3, "H", 1), W = a.integer(4, "W", 1),
                C = a.integer(5, "C", 1);
  const int64_t len = n * D * H * W * C;
  if (a.ok() && len > INT32_MAX) a.fail("input too large for int32 argmax");
  const int64_t m = n * ((D - 1) / 2 + 1) * ((H - 1) / 2 + 1) * ((W - 1) / 2 + 1) * C;
  const float* x = a.f32(0, "x", len);
  float* y = a.f32(6, "y", m);
  int32_t* am = a.i32(7, "argmax", m);
  if (!a.ok()) return nullptr;
  medfl::max_pool(x, n, D, H, W, C, y, am);
  return nullptr;
}

// maxPoolBackward(dy, argmax, n, D, H, W, C, dx): dx written completely (argmax is only compared with).
napi_value MaxPoolBackward(napi_env env, napi_callback_info info) {
  Args a(env, info, 8, "maxPoolBackward");
  const int64_t n = a.integer(2, "n", 1), D = a.integer(3, "D", 1), H = a.integer(4, "H", 1), W = a.integer(5, "W", 1),
                C = a.integer(6, "C", 1);
  const int64_t len = n * D * H * W * C;
  if (a.ok() && len > INT32_MAX) a.fail("input too large for int32 argmax");
  const int64_t m = n * ((D - 1) / 2 + 1) * ((H - 1) / 2 + 1) * ((W - 1) / 2 + 1) * C;
  const float* dy = a.f32(0, "dy", m);
  const int32_t* am = a.i32(1, "argmax", m);
  float* dx = a.f32(7, "dx", len);
  if (!a.ok()) return nullptr;
  medfl::max_pool_backward(dy, am, n, D, H, W, C, dx);
  return nullptr;
}

// groupNormForward(x, n, C, G, gamma, beta, eps, relu, y, mean: Float64Array, invstd: Float64Array)
napi_value GroupNormForward(napi_env env, napi_callback_info info) {
  Args a(env, info, 11, "groupNormForward");
  const size_t len = a.length(0, "x");
  const int64_t n = a.integer(1, "n", 1), C = a.integer(2, "C", 1), G = a.integer(3, "G", 1);
  if (a.ok() && C % G) a.fail("C must be a multiple of G");
  if (a.ok() && (len == 0 || len % (n * C))) a.fail("x must hold n samples of a positive whole number of C-channel voxels");
  const float* x = a.f32(0, "x", len);
  const float* gamma = a.f32(4, "gamma", C);
  const float* beta = a.f32(5, "beta", C);
  const double eps = a.number(6, "eps");
  const bool relu = a.flag(7);
  float* y = a.f32(8, "y", len);
  double* mean = a.f64(9, "mean", n * G);
  double* invstd = a.f64(10, "invstd", n * G);
  if (!a.ok()) return nullptr;
  medfl::group_norm_forward(x, n, len / (n * C), C, G, gamma, beta, eps, relu, y, mean, invstd);
  return nullptr;
}

// groupNormBackward(x, dy, n, C, G, mean, invstd, gamma, y|null, dgamma: Float64Array, dbeta: Float64Array, dx|null)
napi_value GroupNormBackward(napi_env env, napi_callback_info info) {
  Args a(env, info, 12, "groupNormBackward");
  const size_t len = a.length(0, "x");
  const int64_t n = a.integer(2, "n", 1), C = a.integer(3, "C", 1), G = a.integer(4, "G", 1);
  if (a.ok() && C % G) a.fail("C must be a multiple of G");
  if (a.ok() && (len == 0 || len % (n * C))) a.fail("x must hold n samples of a positive whole number of C-channel voxels");
  const float* x = a.f32(0, "x", len);
  const float* dy = a.f32(1, "dy", len);
  const double* mean = a.f64(5, "mean", n * G);
  const double* invstd = a.f64(6, "invstd", n * G);
  const float* gamma = a.f32(7, "gamma", C);
  const float* y = a.f32(8, "y", len, true);
  double* dgamma = a.f64(9, "dgamma", C);
  double* dbeta = a.f64(10, "dbeta", C);
  float* dx = a.f32(11, "dx", len, true);
  if (!a.ok()) return nullptr;
  medfl::group_norm_backward(x, dy, n, len / (n * C), C, G, mean, invstd, gamma, y, dgamma, dbeta, dx);
  return nullptr;
}

// concat(a, Ca, b, Cb, y) · split(y, Ca, Cb, a|null, b|null): channel concatenation of NDHWC tensors.
napi_value Concat(napi_env env, napi_callback_info info) {
  Args a(env, info, 5, "concat");
  const int64_t Ca = a.integer(1, "Ca", 1), Cb = a.integer(3, "Cb", 1);
  const size_t la = a.length(0, "a");
  if (a.ok() && la % Ca) a.fail("a must hold a whole number of Ca-channel voxels");
  const int64_t nv = a.ok() ? static_cast<int64_t>(la) / Ca : 0;
  const float* x = a.f32(0, "a", nv * Ca);
  const float* z = a.f32(2, "b", nv * Cb);
  float* y = a.f32(4, "y", nv * (Ca + Cb));
  if (!a.ok()) return nullptr;
  medfl::concat_channels(x, Ca, z, Cb, nv, y);
  return nullptr;
}

napi_value Split(napi_env env, napi_callback_info info) {
  Args a(env, info, 5, "split");
  const int64_t Ca = a.integer(1, "Ca", 1), Cb = a.integer(2, "Cb", 1);
  const size_t len = a.length(0, "y");
  if (a.ok() && len % (Ca + Cb)) a.fail("y must hold a whole number of (Ca + Cb)-channel voxels");
  const int64_t nv = a.ok() ? static_cast<int64_t>(len) / (Ca + Cb) : 0;
  const float* y = a.f32(0, "y", len);
  float* da = a.f32(3, "a", nv * Ca, true);
  float* db = a.f32(4, "b", nv * Cb, true);
  if (!a.ok()) return nullptr;
  medfl::split_channels(y, Ca, Cb, nv, da, db);
  return nullptr;
}

// biasAdd(y, C, bias): y += bias per channel, in place · channelSum(x, C, sum: Float64Array): sum += Σ_voxels x.
napi_value BiasAdd(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "biasAdd");
  const size_t len = a.length(0, "y");
  const int64_t C = a.integer(1, "C", 1);
  if (a.ok() && len % C) a.fail("y must hold a whole number of C-channel voxels");
  float* y = a.f32(0, "y", len);
  const float* bias = a.f32(2, "bias", C);
  if (!a.ok()) return nullptr;
  medfl::bias_add(y, len / C, C, bias);
  return nullptr;
}

napi_value ChannelSum(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "channelSum");
  const size_t len = a.length(0, "x");
  const int64_t C = a.integer(1, "C", 1);
  if (a.ok() && len % C) a.fail("x must hold a whole number of C-channel voxels");
  const float* x = a.f32(0, "x", len);
  double* sum = a.f64(2, "sum", C);
  if (!a.ok()) return nullptr;
  medfl::channel_sum(x, len / C, C, sum);
  return nullptr;
}

// segmentationLoss(z, target, weight|null, C, smooth, grad) -> loss: z, target, grad [nv, C]; weight [nv].
napi_value SegmentationLoss(napi_env env, napi_callback_info info) {
  Args a(env, info, 6, "segmentationLoss");
  const size_t len = a.length(0, "z");
  const int64_t C = a.integer(3, "C", 2);
  if (a.ok() && (len == 0 || len % C)) a.fail("z must hold a positive whole number of C-class voxels");
  const int64_t nv = a.ok() ? static_cast<int64_t>(len) / C : 0;
  const float* z = a.f32(0, "z", len);
  const float* target = a.f32(1, "target", len);
  const float* weight = a.f32(2, "weight", nv, true);
  const double smooth = a.number(4, "smooth");
  float* grad = a.f32(5, "grad", len);
  if (!a.ok()) return nullptr;
  napi_value out;
  CALL(env, napi_create_double(env, medfl::segmentation_loss(z, target, weight, nv, C, smooth, grad), &out));
  return out;
}

// robustColumns(rows, n, ld, len, base, scale: Float64Array, coef: Float64Array, trim, out): rows [n, ld], the first
// len columns reduced; trim < 0 for the median.
napi_value RobustColumns(napi_env env, napi_callback_info info) {
  Args a(env, info, 9, "robustColumns");
  const int64_t n = a.integer(1, "n", 1), ld = a.integer(2, "ld", 1), len = a.integer(3, "len", 0);
  if (a.ok() && len > ld) a.fail("len must be at most ld");
  int64_t trim = 0;
  if (a.ok()) {
    const double t = a.number(7, "trim");
    trim = t < 0 ? -1 : static_cast<int64_t>(t);
    if (trim >= 0 && (static_cast<double>(trim) != t || 2 * trim >= n)) a.fail("trim must be -1 (median) or a whole number below n / 2");
  }
  const float* rows = a.f32(0, "rows", static_cast<size_t>(n * ld));
  const float* base = a.f32(4, "base", static_cast<size_t>(len));
  const double* scale = a.f64(5, "scale", static_cast<size_t>(n));
  const double* coef = a.f64(6, "coef", static_cast<size_t>(n));
  float* out = a.f32(8, "out", static_cast<size_t>(len));
  if (!a.ok()) return nullptr;
  medfl::robust_columns(rows, n, ld, len, base, scale, coef, trim, out);
  return nullptr;
}

// gaussianFromWords(words: Uint32Array, out: Float32Array): out = N(0, 1) samples from words (out.length rounded up
// to even of them), Box–Muller (see gaussian.h).
napi_value GaussianFromWords(napi_env env, napi_callback_info info) {
  Args a(env, info, 2, "gaussianFromWords");
  const size_t n = a.length(1, "out");
  const uint32_t* words = a.u32(0, "words", n + n % 2);
  float* out = a.f32(1, "out", n);
  if (!a.ok()) return nullptr;
  medfl::gaussian_from_words(words, n, out);
  return nullptr;
}

// deltaSqLanes(x, b|null, lanes: Float64Array(4)): lanes += the four interleaved sums of (x − b)² (see norm.h).
napi_value DeltaSqLanes(napi_env env, napi_callback_info info) {
  Args a(env, info, 3, "deltaSqLanes");
  const size_t n = a.length(0, "x");
  const float* x = a.f32(0, "x", n);
  const float* b = a.f32(1, "b", n, true);
  double* lanes = a.f64(2, "lanes", 4);
  if (!a.ok()) return nullptr;
  medfl::delta_sq_lanes(x, b, static_cast<int64_t>(n), lanes);
  return nullptr;
}

// The fold loops' optional last argument: "sse2" | "avx2" | "avx512" (the same bytes, for tests and benches), or
// undefined for the widest this CPU runs. One it does not run is refused, never replaced.
medfl::FoldIsa fold_isa_arg(Args& a, size_t i) {
  const medfl::FoldIsa best = medfl::fold_best_isa();
  if (!a.ok()) return best;
  napi_valuetype vt = napi_undefined;
  napi_typeof(a.env(), a.arg(i), &vt);
  if (vt == napi_undefined) return best;
  char name[16] = {};
  size_t len = 0;
  if (vt == napi_string && napi_get_value_string_utf8(a.env(), a.arg(i), name, sizeof name, &len) == napi_ok) {
    for (const medfl::FoldIsa isa : {medfl::FoldIsa::kSse2, medfl::FoldIsa::kAvx2, medfl::FoldIsa::kAvx512}) {
      if (std::string(name) != medfl::fold_isa_name(isa)) continue;
      if (medfl::fold_isa_supported(isa)) return isa;
      a.fail(std::string("this CPU does not run the ") + name + " fold (it runs up to " + medfl::fold_isa_name(best) + ")");
      return best;
    }
  }
  a.fail("variant must be \"sse2\", \"avx2\", \"avx512\" or undefined");
  return best;
}

// foldVariants() → { best, supported: [names] }: which fold loop runs by default here, and which a caller may name.
napi_value FoldVariants(napi_env env, napi_callback_info) {
  napi_value out, list, v;
  CALL(env, napi_create_object(env, &out));
  CALL(env, napi_create_array(env, &list));
  uint32_t at = 0;
  for (const medfl::FoldIsa isa : {medfl::FoldIsa::kSse2, medfl::FoldIsa::kAvx2, medfl::FoldIsa::kAvx512}) {
    if (!medfl::fold_isa_supported(isa)) continue;
    CALL(env, napi_create_string_utf8(env, medfl::fold_isa_name(isa), NAPI_AUTO_LENGTH, &v));
    CALL(env, napi_set_element(env, list, at++, v));
  }
  CALL(env, napi_set_named_property(env, out, "supported", list));
  CALL(env, napi_create_string_utf8(env, medfl::fold_isa_name(medfl::fold_best_isa()), NAPI_AUTO_LENGTH, &v));
  CALL(env, napi_set_named_property(env, out, "best", v));
  return out;
}

// foldChecked(x, b|null, isDelta, sums: Float64Array, a, maxValue, lanes: Float64Array(4)[, variant]) → elements
// folded (see fold.h).
napi_value FoldChecked(napi_env env, napi_callback_info info) {
  Args a(env, info, 7, "foldChecked");
  const size_t n = a.length(0, "x");
  const float* x = a.f32(0, "x", n);
  const float* b = a.f32(1, "b", n, true);
  const bool is_delta = a.flag(2);
  double* sums = a.f64(3, "sums", n);
  const double w = a.number(4, "a");
  const double max_value = a.number(5, "maxValue");
  double* lanes = a.f64(6, "lanes", 4);
  const medfl::FoldIsa isa = fold_isa_arg(a, 7);
  if (is_delta && !b) a.fail("a delta-encoded update needs the base");
  if (!a.ok()) return nullptr;
  const int64_t folded = medfl::fold_checked(x, b, is_delta, static_cast<int64_t>(n), sums, w, max_value, lanes, isa);
  napi_value out;
  CALL(env, napi_create_double(env, static_cast<double>(folded), &out));
  return out;
}

// foldCheckedBatch(xs: Float32Array[k], b|null, isDelta, sums: Float64Array, a: Float64Array(k), maxValue,
// lanes: Float64Array(4k)[, variant]) → elements folded (see fold.h); every xs[j] as long as sums.
napi_value FoldCheckedBatch(napi_env env, napi_callback_info info) {
  Args a(env, info, 7, "foldCheckedBatch");
  uint32_t k = 0;
  bool is_array = false;
  if (a.ok() && (napi_is_array(env, a.arg(0), &is_array) != napi_ok || !is_array || napi_get_array_length(env, a.arg(0), &k) != napi_ok))
    a.fail("xs must be an array of Float32Arrays");
  if (a.ok() && (k < 1 || k > static_cast<uint32_t>(medfl::kFoldBatchMax)))
    a.fail("xs must hold 1 to " + std::to_string(medfl::kFoldBatchMax) + " updates");
  const float* xs[medfl::kFoldBatchMax] = {};
  size_t n = 0;
  for (uint32_t j = 0; j < k && a.ok(); ++j) {
    napi_value el, ab;
    void* data = nullptr;
    size_t len = 0, offset = 0;
    bool is_typed = false;
    napi_typedarray_type type = napi_int8_array;
    if (napi_get_element(env, a.arg(0), j, &el) != napi_ok || napi_is_typedarray(env, el, &is_typed) != napi_ok || !is_typed ||
        napi_get_typedarray_info(env, el, &type, &len, &data, &ab, &offset) != napi_ok || type != napi_float32_array) {
      a.fail("xs must be an array of Float32Arrays");
      break;
    }
    if (j == 0) n = len;
    else if (len != n) a.fail("every update in xs must have the same length");
    xs[j] = static_cast<const float*>(data);
  }
  const float* b = a.f32(1, "b", n, true);
  const bool is_delta = a.flag(2);
  double* sums = a.f64(3, "sums", n);
  const double* w = a.f64(4, "a", k);
  const double max_value = a.number(5, "maxValue");
  double* lanes = a.f64(6, "lanes", 4 * static_cast<size_t>(k));
  const medfl::FoldIsa isa = fold_isa_arg(a, 7);
  if (is_delta && !b) a.fail("a delta-encoded update needs the base");
  if (!a.ok()) return nullptr;
  const int64_t folded = medfl::fold_checked_batch(xs, static_cast<int>(k), b, is_delta, static_cast<int64_t>(n), sums, w,
                                                   max_value, lanes, isa);
  napi_value out;
  CALL(env, napi_create_double(env, static_cast<double>(folded), &out));
  return out;
}

// foldMeanF32(sums: Float64Array, inv[, variant]) → Float32Array: sums[i]·inv rounded to float32, written over the
// sums' own memory (its first half), which the returned array views (see fold.h fold_mean_f32).
napi_value FoldMeanF32(napi_env env, napi_callback_info info) {
  Args a(env, info, 2, "foldMeanF32");
  size_t n = 0;
  void* data = nullptr;
  napi_value buffer = nullptr;
  size_t offset = 0;
  napi_typedarray_type type = napi_int8_array;
  bool is_typed = false;
  if (napi_is_typedarray(env, a.arg(0), &is_typed) != napi_ok || !is_typed ||
      napi_get_typedarray_info(env, a.arg(0), &type, &n, &data, &buffer, &offset) != napi_ok || type != napi_float64_array)
    a.fail("sums must be a Float64Array");
  const double inv = a.number(1, "inv");
  const medfl::FoldIsa isa = fold_isa_arg(a, 2);
  if (!a.ok()) return nullptr;
  medfl::fold_mean_f32(static_cast<const double*>(data), static_cast<int64_t>(n), inv, static_cast<float*>(data), isa);
  napi_value out;
  CALL(env, napi_create_typedarray(env, napi_float32_array, n, buffer, offset, &out));
  return out;
}

// windowBlend(logits, geom: Int32Array [n, C, f, wd, wh, ww, D, H, W], starts: Int32Array [n·3], weight, acc, wsum)
// (see window_blend.h): acc and wsum are added to in place.
napi_value WindowBlend(napi_env env, napi_callback_info info) {
  Args a(env, info, 6, "windowBlend");
  const int32_t* gp = a.i32(1, "geom", 9);
  medfl::WindowBlendGeom g{};
  if (a.ok()) g = {gp[0], gp[1], gp[2], gp[3], gp[4], gp[5], gp[6], gp[7], gp[8]};
  if (a.ok() && (g.n < 1 || g.C < 2 || g.f < 1 || g.wd < 1 || g.wh < 1 || g.ww < 1 || g.D < 1 || g.H < 1 || g.W < 1))
    a.fail("geometry must be positive, with at least 2 classes");
  if (a.ok() && (g.wd % g.f || g.wh % g.f || g.ww % g.f)) a.fail("the window's sides must be multiples of the upsampling factor");
  const int32_t* starts = a.i32(2, "starts", static_cast<size_t>(3 * g.n));
  if (a.ok()) {
    const int64_t win[3] = {g.wd, g.wh, g.ww}, vol[3] = {g.D, g.H, g.W};
    for (int64_t i = 0; i < 3 * g.n && a.ok(); ++i) {
      const int64_t s = starts[i], ax = i % 3;
      // A window starts inside the volume and ends inside it, or starts at 0 on a side shorter than the window.
      if (s < 0 || s >= vol[ax] || s + win[ax] > std::max(vol[ax], win[ax])) a.fail("a window start lies outside the volume");
    }
  }
  const size_t voxels = static_cast<size_t>(g.D * g.H * g.W);
  const size_t coarse = static_cast<size_t>(g.n * (g.wd / std::max<int64_t>(g.f, 1)) * (g.wh / std::max<int64_t>(g.f, 1)) * (g.ww / std::max<int64_t>(g.f, 1)) * g.C);
  const float* logits = a.f32(0, "logits", coarse);
  const float* weight = a.f32(3, "weight", static_cast<size_t>(g.wd * g.wh * g.ww));
  float* acc = a.f32(4, "acc", voxels * (g.C == 2 ? 1 : static_cast<size_t>(g.C)));
  float* wsum = a.f32(5, "wsum", voxels);
  if (!a.ok()) return nullptr;
  medfl::window_blend(logits, starts, g, weight, acc, wsum);
  return nullptr;
}

// windowNormalise(acc, wsum, C, out): out [voxels, C] = acc / wsum (two classes: acc holds class 1 only).
napi_value WindowNormalise(napi_env env, napi_callback_info info) {
  Args a(env, info, 4, "windowNormalise");
  const size_t voxels = a.length(1, "wsum");
  const int64_t C = a.integer(2, "C", 2);
  const float* acc = a.f32(0, "acc", voxels * (C == 2 ? 1 : static_cast<size_t>(C)));
  const float* wsum = a.f32(1, "wsum", voxels);
  float* out = a.f32(3, "out", voxels * static_cast<size_t>(C));
  if (!a.ok()) return nullptr;
  medfl::window_normalise(acc, wsum, static_cast<int64_t>(voxels), C, out);
  return nullptr;
}

void delete_instance(napi_env env, void* data, void* hint) { delete static_cast<Instance*>(data); }

}  // namespace

NAPI_MODULE_INIT() {
  Instance* inst = nullptr;
  try {
    inst = new Instance();
  } catch (const std::exception& e) {
    napi_throw_error(env, nullptr, (std::string("oneDNN: could not create a CPU engine: ") + e.what()).c_str());
    return nullptr;
  }
  if (napi_set_instance_data(env, inst, delete_instance, nullptr) != napi_ok) {
    delete inst;
    napi_throw_error(env, nullptr, "oneDNN addon: could not set instance data");
    return nullptr;
  }
  const napi_property_descriptor props[] = {
      {"run", nullptr, Run, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"impl", nullptr, Impl, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"drop", nullptr, Drop, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"setThreads", nullptr, SetThreads, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"info", nullptr, Info, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"clearCache", nullptr, ClearCache, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"bnStats", nullptr, BnStats, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"scaleShift", nullptr, ScaleShift, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"bnBackward", nullptr, BnBackward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"relu", nullptr, Relu, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"reluBackward", nullptr, ReluBackward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"add", nullptr, Add, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"addInto", nullptr, AddInto, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"maxPool", nullptr, MaxPool, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"maxPoolBackward", nullptr, MaxPoolBackward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"adamStep", nullptr, AdamStep, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"sgdStep", nullptr, SgdStep, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"groupNormForward", nullptr, GroupNormForward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"groupNormBackward", nullptr, GroupNormBackward, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"concat", nullptr, Concat, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"split", nullptr, Split, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"biasAdd", nullptr, BiasAdd, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"channelSum", nullptr, ChannelSum, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"segmentationLoss", nullptr, SegmentationLoss, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"robustColumns", nullptr, RobustColumns, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"deltaSqLanes", nullptr, DeltaSqLanes, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"foldChecked", nullptr, FoldChecked, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"foldCheckedBatch", nullptr, FoldCheckedBatch, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"foldVariants", nullptr, FoldVariants, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"foldMeanF32", nullptr, FoldMeanF32, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"gaussianFromWords", nullptr, GaussianFromWords, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"windowBlend", nullptr, WindowBlend, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"windowNormalise", nullptr, WindowNormalise, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  return exports;
}
