// oneDNN-backed 3D convolution (forward, backward-data, backward-filter) on caller-owned buffers.
// Activations NDHWC, weights DHWIO ([kD, kH, kW, cin, cout]), float32.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

namespace medfl {

// n, in[3], cin, cout, k[3], stride[3], dilation[3] (1 = none), padBefore[3], padAfter[3], out[3]
constexpr int kGeomLen = 24;
using Geom = std::array<int64_t, kGeomLen>;

enum class Op : int { Forward = 0, BackwardData = 1, BackwardFilter = 2 };

// How the primitive's memory formats are chosen:
//  Plain:      src/dst ndhwc and weights dhwio exactly as the caller holds them (no reorders);
//  AnyWeights: activations plain, weights format_tag::any (weights reordered each call; they are small);
//  Any:        every tensor format_tag::any (reorders on activations too);
//  Ncsp:       activations reordered to ncdhw (PyTorch's default layout), weights any.
enum class Layout : int { Plain = 0, AnyWeights = 1, Any = 2, Ncsp = 3 };

struct Slot {
  int arg = 0;
  bool output = false;
  bool reordered = false;
  dnnl::memory user;     // wraps the caller's buffer (handle set on every call)
  dnnl::memory internal; // the primitive's own format, when it differs
  dnnl::reorder to_internal, to_user;
};

struct Plan {
  dnnl::primitive prim;
  std::vector<Slot> slots;  // order: for Forward x, w, y; BackwardData dy, w, dx; BackwardFilter x, dy, dw
  dnnl::memory scratchpad;
  std::string impl;
  uint64_t last_use = 0;
};

class ConvEngine {
 public:
  ConvEngine();
  // ptrs follow the slot order of the op. Throws dnnl::error or std::runtime_error.
  void run(Op op, Layout layout, const Geom& g, const std::array<void*, 3>& ptrs);
  std::string impl(Op op, Layout layout, const Geom& g);
  // Forgets one cached plan (its primitive, reorders and buffers); false when there was none.
  bool drop(Op op, Layout layout, const Geom& g);
  size_t cached() const { return plans_.size(); }
  void clear() { plans_.clear(); }

 private:
  Plan& plan(Op op, Layout layout, const Geom& g);
  std::unique_ptr<Plan> build(Op op, Layout layout, const Geom& g);

  // Plans kept at most; past it the least recently used is dropped (a training run repeats a few dozen
  // geometries; evaluation on volumes of many sizes should not grow the cache without bound).
  static constexpr size_t kMaxPlans = 192;
  uint64_t clock_ = 0;
  dnnl::engine engine_;
  dnnl::stream stream_;
  std::map<std::pair<int, Geom>, std::unique_ptr<Plan>> plans_;
};

}  // namespace medfl
