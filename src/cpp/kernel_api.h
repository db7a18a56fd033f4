// The contract between the Python layer and the kernels: one flat struct describing a BCE pass.
//
// A pass reads input x and target y (same dtype, C-contiguous, n elements), optionally a weight w and a
// positive-class weight p broadcast in one of the forms below, and writes any of: the per-element loss, the
// gradient in x, the gradient in y. It also returns the sum of the per-element loss over the kept elements
// and their count. Only the kernels know about memory layout; the Python layer maps shapes to these forms.
#pragma once
#include <cstdint>

namespace bcekit {

// The codes and constants below are exported by the core module (core.cpp) and read from there by the
// Python layer (bcekit._native) and the Triton launcher: this header is their one home.
enum Dtype : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };
enum Kind : int { PROBABILITIES = 0, LOGITS = 1 };
// How a weight of the input's shape S is stored: absent, one value, S[-1] values along the last
// dimension (index i % inner), one value per row of `inner` elements (index i / inner), or all of S.
enum Broadcast : int { ABSENT = 0, SCALAR = 1, PER_CLASS = 2, PER_ROW = 3, FULL = 4 };
// torch's reduction enum (torch.nn._reduction.get_enum): per-element losses, their mean, their sum.
enum Reduction : int { REDUCE_NONE = 0, REDUCE_MEAN = 1, REDUCE_SUM = 2 };
// The probability loss's input gradient is (x - y) / max(x (1 - x), GRAD_EPSILON): torch's clamp,
// 1e-12 as torch stores it (rounded to float32).
constexpr double GRAD_EPSILON = 9.999999960041972e-13;

// The float64 loss of a block of contiguous elements: x, y and (where given) a weight and a pos_weight per
// element (bcekit score's columns, or a float64 pass's gathered block).
struct LossBlock {
    int kind = LOGITS;
    int64_t n = 0;
    const double* x = nullptr;
    const double* y = nullptr;
    const double* w = nullptr;  // or null: 1
    const double* p = nullptr;  // or null: 1 (logits only)
    double label_smoothing = 0.0;
    bool has_ignore = false;
    double ignore_index = 0.0;  // NaN matches NaN targets
};

using LossBlockFn = int64_t (*)(const LossBlock&, double* loss, uint8_t* slow);

struct Args {
    int kind = LOGITS;
    int dtype = F32;
    int64_t n = 0;
    const void* x = nullptr;
    const void* y = nullptr;
    const void* w = nullptr;
    const void* p = nullptr;
    int w_mode = ABSENT, p_mode = ABSENT;
    int64_t w_inner = 1, p_inner = 1;
    // Per-element grad_output (the backward of reduction='none'), or null: gradients are then scaled by
    // `grad_scale` alone (1/n for a mean, times the scalar grad_output).
    const void* grad_output = nullptr;
    double grad_scale = 1.0;
    void* loss = nullptr;         // per-element loss out, or null
    void* grad_input = nullptr;   // d(loss)/dx out, or null
    void* grad_target = nullptr;  // d(loss)/dy out, or null
    bool want_sum = false;        // accumulate the loss sum
    double label_smoothing = 0.0;
    bool has_ignore = false;
    double ignore_index = 0.0;    // NaN matches NaN targets
    // Write grad_input with streaming (non-temporal) stores: set by the runner for float32 gradients
    // larger than the last-level cache, 32-byte aligned. Kernels may ignore it.
    bool stream_outputs = false;
    // float64: the double-double lanes of this CPU's build (set by the runner), or null: long double only
    LossBlockFn losses64 = nullptr;
};

// One chunk [begin, end): adds the chunk's loss sum and kept count.
struct ChunkResult {
    long double sum = 0.0L;
    int64_t kept = 0;
    // probability loss only: an input outside [0, 1] (or NaN), a kept target outside [0, 1] (or NaN)
    bool bad_input = false;
    bool bad_target = false;
};

using ChunkFn = ChunkResult (*)(const Args&, int64_t begin, int64_t end);

// Vector kernels (float, float16, bfloat16 storage; computed in double lanes), one build per ISA.
// elementwise(): the vector math functions by name, for the accuracy tests (false: no such function)
namespace isa_baseline {
ChunkFn vector_kernel(int dtype);
bool elementwise(const char* name, const double* in, double* out, int64_t n);
}  // namespace isa_baseline
#if defined(BCEKIT_HAVE_AVX2)
namespace isa_avx2 {
ChunkFn vector_kernel(int dtype);
bool elementwise(const char* name, const double* in, double* out, int64_t n);
}  // namespace isa_avx2
#endif

// float64 storage: computed in long double with libm (exact to ~0.5 ulp where long double is x87).
ChunkResult extended_chunk(const Args&, int64_t begin, int64_t end);

// Double-double lanes (dd_kernel.h), one build per ISA: writes loss[0, n) (0 for ignored elements) and
// sets slow[i] = 1 where element i lies outside the lanes' domain (a value that is not finite, |x| > 600,
// a target outside [0, 1], a negative pos_weight, a weight beyond 2^400, a result below 2^-900): the caller
// computes those in long double (exact_losses64 does both). Returns how many there are.
namespace isa_baseline {
int64_t losses64(const LossBlock&, double* loss, uint8_t* slow);
int64_t level_sums(const double* values, int64_t n, double* sums, int64_t max_sums);
}
#if defined(BCEKIT_HAVE_AVX2)
namespace isa_avx2 {
int64_t losses64(const LossBlock&, double* loss, uint8_t* slow);
int64_t level_sums(const double* values, int64_t n, double* sums, int64_t max_sums);
}
namespace isa_avx512 {
int64_t losses64(const LossBlock&, double* loss, uint8_t* slow);
int64_t level_sums(const double* values, int64_t n, double* sums, int64_t max_sums);
}
#endif

// Exact sums of values[0, n) (n <= 256) as a few doubles whose exact total is the values' exact total
// (dd_kernel.h): returns how many, or -1 (a value not finite or beyond 2^1000: add them one by one).
using LevelSumsFn = int64_t (*)(const double* values, int64_t n, double* sums, int64_t max_sums);

// CSV lines [begin, end) of n_fields fields each (csv_numbers.cpp): field f's number goes to out[slot[f]]
// from row row0 on (slot[f] < 0: not read); returns the lines read, or -1 where a line is not plain numbers
// exactly as pyarrow would read them (the caller then lets pyarrow read them), or exceeds capacity rows.
int64_t parse_csv_lines(const char* begin, const char* end, int n_fields, const int* slot, double* const* out,
                        int64_t row0, int64_t capacity);

// The block's losses by `lanes` (a losses64 build; null: none), the elements they leave computed in long
// double as extended_chunk computes them, rounded once (extended_kernel.cpp); slow[0, n) is scratch.
// Returns how many elements went to long double.
int64_t exact_losses64(LossBlockFn lanes, const LossBlock&, double* loss, uint8_t* slow);

}  // namespace bcekit
