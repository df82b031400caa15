// The coordinator's checked fold: one pass over an update that both checks it (every proposed weight finite and
// within ±max_value, the delta's squared L2 norm in four float64 lanes) and folds it into the float64 sums.
// Semantics and the JS twin: coordinator/aggregation/checked-fold.ts.
#pragma once

#include <cstdint>

namespace medfl {

// The instruction sets the fold loops are built for. The addon is compiled for x86-64-v2 (SSE4.2: two float64 lanes
// per instruction); the AVX2 and AVX-512 loops are compiled beside it and chosen at run time by what the CPU has.
// Every variant gives the same bytes: the same operations in the same order per value, each product and sum rounded
// on its own (no fused multiply-add), only more values per instruction.
enum class FoldIsa : int { kSse2 = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest variant this CPU runs (decided once).
FoldIsa fold_best_isa();
// Whether this CPU (and this build: the AVX ones exist on x86-64 only) runs `isa`.
bool fold_isa_supported(FoldIsa isa);
// "sse2", "avx2", "avx512".
const char* fold_isa_name(FoldIsa isa);

// Works block by block (kFoldBlock floats, a multiple of four): a block is first checked while it is read into
// cache, then folded (sums[i] += a * x[i]) from cache, so the update is read from memory once. A block holding a
// non-finite value or a weight beyond ±max_value is not folded, and the function returns its start: every
// element before it was folded, nothing at or after it was. Returns n when all of it was folded.
// Proposed weight: x[i], or b[i] + x[i] when is_delta (b is then required). Norm operand: x[i] when is_delta or
// b is null, else x[i] - b[i]. The lanes are added to in delta_sq_lanes' order (norm.h), bit for bit.
// `isa` must be supported (fold_isa_supported).
int64_t fold_checked(const float* x, const float* b, bool is_delta, int64_t n, double* sums, double a,
                     double max_value, double* lanes, FoldIsa isa = fold_best_isa());

constexpr int64_t kFoldBlock = 8192;

// k updates folded in one pass over the sums (the updates waiting when a fold starts): per block, each update's
// block is checked as fold_checked checks it (its own four lanes, lanes[4j..4j+3]), then every sum is read once,
// gets a[0]·xs[0][i], then a[1]·xs[1][i], … added in that order (each product and each sum rounded as in
// fold_checked), and is written once. The sums are therefore fold_checked's after folding the updates one by one,
// bit for bit, at 4 + 16/k bytes of memory traffic per update value instead of 20. When any update's block fails
// the check, nothing at or after that block is folded, and the function returns its start (n: all folded).
int64_t fold_checked_batch(const float* const* xs, int k, const float* b, bool is_delta, int64_t n, double* sums,
                           const double* a, double max_value, double* lanes, FoldIsa isa = fold_best_isa());

// The most updates one batch call takes (their block pointers and weights live on the stack).
constexpr int kFoldBatchMax = 32;

// The round's close for a plain mean: y[i] = (float)(sums[i] * inv) for i < n, one rounding for the product and one
// to float32 (to nearest, as JS's Float32Array store). y may be the sums' own memory, float32 over the float64 (each
// sum is read before anything is written over it: the loop goes upwards and reads a step before writing it).
void fold_mean_f32(const double* sums, int64_t n, double inv, float* y, FoldIsa isa = fold_best_isa());

}  // namespace medfl
