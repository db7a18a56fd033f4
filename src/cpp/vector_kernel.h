// The vectorised kernel: float, float16 and bfloat16 storage, computed W lanes at a time in double.
//
// Included once per instruction set by kernels_<isa>.cpp, inside namespace BCEKIT_ISA; written with
// GCC/Clang vector extensions so the same source becomes SSE2, AVX2+FMA or NEON code.
//
// This file holds the exact path (exact_chunk): every pass it is given, every option, every value. The
// passes of a training step (a reduced loss, an input gradient) go to the fast path of fast_kernel.h,
// included at the end, which hands back to exact_chunk whatever it does not take.
//
// Why double lanes: the loss must stay within 2 ulp of exact (it is 0.5 ulp in practice) and the input
// gradient (1 - y) s(x) - p y s(-x) must not cancel more than torch's float32 evaluation does. Every
// quantity below is formed in double and rounded to the storage type once, so the float results equal the
// float64 evaluation of the same formulas (bcekit._math) up to the last bit in all but rare ties.
//
// The transcendental functions are our own polynomials (libm has no vector entry points we may rely on):
//   exp(-a), a >= 0: a = k ln2 + r, |r| <= ln2/2, exp(-r) = 1 - r P(-r) with a degree-7 Chebyshev fit P
//                    (2^-38.7 relative), times 2^-k built in the exponent bits.
//   log(1 + f), f in [-0.2929, 0.4143]: 2 atanh(s), s = f / (2 + f), |s| <= 0.1716, by 6 terms of the
//                    atanh series (truncation < 5e-11 relative, 2^-34).
// float32's unit roundoff is 2^-24, so both leave the rounded results as if computed exactly, and leave
// 10 bits of headroom for the cancellation in the gradient (1 - y) s(x) - p y s(-x) near s(x) = y.
// tests/test_kernels.py checks both against mpmath.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>

#include "kernel_api.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace bcekit {
namespace BCEKIT_ISA {

// W = 4 double lanes: one AVX2 register (two SSE2/NEON ones). The kernel works on blocks of B elements
// held in L1 and runs each stage (load, exp, log1p, combine) over the whole block before the next, so that
// the loop of a stage has a short body and the CPU overlaps its iterations: a whole element's dependency
// chain per loop iteration is several hundred cycles long and would leave the FPU mostly idle.
constexpr int W = 4;
constexpr int B = 256;
typedef double vd __attribute__((vector_size(8 * W)));
typedef int64_t vl __attribute__((vector_size(8 * W)));
typedef float vf __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

inline vd splat(double v) { return vd{} + v; }
inline vl splat_l(int64_t v) { return vl{} + v; }
inline vl lane_index() {
    vl idx{};
    for (int j = 0; j < W; ++j) idx[j] = j;
    return idx;
}
inline vd select(vl mask, vd a, vd b) { return mask ? a : b; }
inline vd vmax0(vd a) { return select(a > 0.0, a, splat(0.0)); }
inline vd vmin(vd a, double b) { return select(a < b, a, splat(b)); }
inline vl isnan_v(vd a) { return a != a; }
inline vl isinf_v(vd a) { return (a == std::numeric_limits<double>::infinity()) | (a == -std::numeric_limits<double>::infinity()); }

constexpr double SHIFTER = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
constexpr double LN2 = 0.6931471805599453094;
constexpr double LN2_HI = 6.93147180369123816490e-01;  // 32 significant bits: k * LN2_HI is exact for k < 2^21
constexpr double LN2_LO = 1.90821492927058770002e-10;
constexpr double INV_LN2 = 1.4426950408889634074;

// Hot helpers are always inlined: with many kernel instantiations GCC's size heuristics otherwise turn
// them into calls, which breaks the interleaving the stage loops rely on (measured 25% slower).
#define BCEKIT_INLINE inline __attribute__((always_inline))

// exp(-a) for finite a in [0, 708] only (the caller checked): no clamping, no NaN handling.
// a = k ln2 + r, |r| <= ln2/2; one FMA forms -r = k ln2 - a (ln2 rounded to double: k < 1022 puts the
// error below 2^-43 absolute); exp(-r) = 1 - r P(-r) with P a degree-7 Chebyshev fit of expm1(q)/q
// (relative error 2^-38.7), evaluated in Estrin's scheme (a chain of 4 FMAs instead of 8). 2^-k goes
// straight into the exponent bits: the low bits of t = a/ln2 + 1.5 * 2^52 hold k.
BCEKIT_INLINE vd exp_neg_finite(vd a) {
    typedef uint64_t vq_ __attribute__((vector_size(8 * W)));
    const vd t = a * INV_LN2 + SHIFTER;
    const vd q = (t - SHIFTER) * LN2 - a;  // -r
    const vd q2 = q * q, q4 = q2 * q2;
    const vd p01 = q * 0.499999999999551067455 + 0.999999999995509040538;
    const vd p23 = q * 0.0416666667862657343265 + 0.16666666786308586202;
    const vd p45 = q * 0.00138888391105720083021 + 0.00833328353870852702358;
    const vd p67 = q * 0.0000248678701796877261433 + 0.000199075693108482891995;
    const vd p = ((p67 * q2 + p45) * q4 + (p23 * q2 + p01)) * q + 1.0;
    return (vd)((vq_)p - ((vq_)t << 52));
}

// exp(-a) for a >= 0, +inf or NaN (NaN propagates).
inline vd exp_neg(vd a) {
    vd e = exp_neg_finite(vmin(a, 708.0));  // beyond 708, exp(-a) < 2^-1021: flushed to 0
    e = select(a > 708.0, splat(0.0), e);
    return select(isnan_v(a), a, e);
}

// 2 atanh(f / (2 + f)) = log(1 + f) for f in [-0.2929, 0.4143].
inline vd log1p_reduced(vd f) {
    vd s = f / (f + 2.0);
    vd z = s * s;
    vd poly = splat(1.0 / 11.0);
    poly = poly * z + 1.0 / 9.0;
    poly = poly * z + 1.0 / 7.0;
    poly = poly * z + 1.0 / 5.0;
    poly = poly * z + 1.0 / 3.0;
    poly = poly * z + 1.0;
    return (s + s) * poly;
}

// log1p(e) for e in [0, 1] (or NaN): 1 + e = 2 (1 + (e - 1) / 2) above sqrt(2) - 1. (exp_neg never gives
// a subnormal e; for one, the result is off by up to one subnormal step.)
inline vd log1p_unit(vd e) {
    vl big = e > 0.41421356237309503;
    vd f = select(big, (e - 1.0) * 0.5, e);
    return select(big, splat(LN2), splat(0.0)) + log1p_reduced(f);
}

// u = 2^k (1 + f) with f in [-0.2929, 0.4143], for positive normal u (kd = k as a double).
inline void decompose(vd u, vd& kd, vd& f) {
    const vl one_bits = (vl)splat(1.0);
    vl bits = (vl)u;
    vl k = (bits >> 52) - 1023;
    vd m = (vd)((bits & 0x000fffffffffffffLL) | one_bits);
    vl big = m > 1.4142135623730951;
    m = select(big, m * 0.5, m);
    k = k - big;  // big is -1 where true
    kd = (vd)(k + (vl)splat(SHIFTER)) - SHIFTER;
    f = m - 1.0;
}

// log(u) for normal u in (0, 1] (all the kernel passes: float data are normal doubles); u = 0 gives -inf.
inline vd log_unit(vd u) {
    vd kd, f;
    decompose(u, kd, f);
    return select(u == 0.0, splat(-std::numeric_limits<double>::infinity()), kd * LN2 + log1p_reduced(f));
}

// log(x) and log1p(-x) for x in [0, 1]. Below 0.2929, 1 - x would round away -x's low digits, so log1p
// is evaluated on f = -x directly; above, 1 - x is exact and is reduced like any argument of log.
inline void log_pair(vd x, vd& log_x, vd& log_1mx) {
    const vd inf = splat(-std::numeric_limits<double>::infinity());
    vd kx, fx, k1, f1;
    decompose(x, kx, fx);
    const vl small = x < 0.29289321881345248;
    decompose(select(small, splat(1.0), 1.0 - x), k1, f1);
    k1 = select(small, splat(0.0), k1);
    f1 = select(small, -x, f1);
    log_x = select(x == 0.0, inf, kx * LN2 + log1p_reduced(fx));
    log_1mx = select(x == 1.0, inf, k1 * LN2 + log1p_reduced(f1));
}

// ---------------------------------------------------------------------------------------------------
// Storage types
// ---------------------------------------------------------------------------------------------------

// The operands may sit at any address: a NumPy view at an odd byte offset, a tensor over a byte buffer.
// Elements are therefore never read or written through a typed pointer (which requires the type's
// alignment) but through memcpy, which is defined for any address and compiles to the same single move
// (vector loads and stores likewise go through memcpy or the unaligned intrinsics). Pointers to the
// storage types serve for address arithmetic only.
template <class U> BCEKIT_INLINE U load_bits(const void* p) { U v; std::memcpy(&v, p, sizeof v); return v; }
template <class U> BCEKIT_INLINE void store_bits(void* p, U v) { std::memcpy(p, &v, sizeof v); }

// float16 and bfloat16 storage: 16 bits each, read and written with load_bits and store_bits.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float half_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    uint32_t out;
    if (em >= 0x7c00u) {
        out = (em << 13) | 0x7f800000u;  // inf, NaN
    } else {
        // reinterpreting the shifted bits as a float is 2^-112 times the value, subnormals included
        out = float_to_bits(bits_to_float(em << 13) * 0x1p112f);
    }
    return bits_to_float(out | sign);
}

inline uint16_t float_to_half(float f) {  // round to nearest even
    uint32_t b = float_to_bits(f);
    uint32_t sign = (b >> 16) & 0x8000u;
    uint32_t a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) return uint16_t(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow
    if (a < 0x38800000u) {
        // below 2^-14: adding 0.5 puts the value's half-subnormal units in the low bits, rounded by the FPU
        float t = bits_to_float(a) + 0.5f;
        return uint16_t(sign | (float_to_bits(t) - 0x3f000000u));
    }
    uint32_t odd = (a >> 13) & 1u;
    a += 0xc8000fffu + odd;  // rebias the exponent (-112 << 23) and round
    return uint16_t(sign | (a >> 13));
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
    uint32_t b = float_to_bits(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return uint16_t(b >> 16);
}

template <class T> struct Storage;
template <> struct Storage<float> {
    static double get(const float* p) { return load_bits<float>(p); }
    static void put(float* p, double v) { store_bits(p, float(v)); }
    static vd loadw(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return __builtin_convertvector(v, vd); }
    static void storew(float* p, vd v) { vf f = __builtin_convertvector(v, vf); std::memcpy(p, &f, sizeof f); }
};
template <> struct Storage<half_t> {
    static double get(const half_t* p) { return half_to_float(load_bits<uint16_t>(p)); }
    // half results are computed as float32 values, then rounded (as torch rounds its float32 math)
    static void put(half_t* p, double v) { store_bits(p, float_to_half(float(v))); }
    static vd loadw(const half_t* p) {
        vd v;
        for (int j = 0; j < W; ++j) v[j] = get(p + j);
        return v;
    }
    static void storew(half_t* p, vd v) { for (int j = 0; j < W; ++j) put(p + j, v[j]); }
};
template <> struct Storage<bf16_t> {
    static double get(const bf16_t* p) { return bf16_to_float(load_bits<uint16_t>(p)); }
    static void put(bf16_t* p, double v) { store_bits(p, float_to_bf16(float(v))); }
    typedef uint16_t vh __attribute__((vector_size(2 * W)));
    static vd loadw(const bf16_t* p) {
        vh h;
        std::memcpy(&h, p, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        return __builtin_convertvector((vf)u, vd);
    }
    static void storew(bf16_t* p, vd v) {
        vu b = (vu)__builtin_convertvector(v, vf);
        vu nan = (b & 0x7fffffffu) > 0x7f800000u;
        vu rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        vh out = __builtin_convertvector(nan ? ((b >> 16) | 0x40u) : rounded, vh);
        std::memcpy(p, &out, sizeof out);
    }
};

// A broadcast weight, read lane by lane in element order.
template <class T>
struct WeightReader {
    const T* data;
    int mode;
    int64_t inner, col = 0, row = 0;
    double scalar = 1.0;

    WeightReader(const void* ptr, int mode_, int64_t inner_, int64_t begin)
        : data(static_cast<const T*>(ptr)), mode(ptr ? mode_ : ABSENT), inner(inner_ > 0 ? inner_ : 1) {
        if (mode == SCALAR) scalar = Storage<T>::get(data);
        col = begin % inner;
        row = begin / inner;
    }
    // values for elements i .. i + lanes - 1 (the caller walks the chunk in order)
    vd next(int64_t i, int lanes) {
        vd v = splat(scalar);
        if (mode == FULL) {
            if (lanes == W) return Storage<T>::loadw(data + i);
            for (int j = 0; j < lanes; ++j) v[j] = Storage<T>::get(data + i + j);
        } else if (mode == PER_CLASS || mode == PER_ROW) {
            for (int j = 0; j < lanes; ++j) {
                v[j] = Storage<T>::get(data + (mode == PER_CLASS ? col : row));
                if (++col == inner) { col = 0; ++row; }
            }
        }
        return v;
    }
};

template <class T>
inline vd load_lanes(const T* p, int64_t i, int lanes, double pad) {
    if (lanes == W) return Storage<T>::loadw(p + i);
    vd v = splat(pad);
    for (int j = 0; j < lanes; ++j) v[j] = Storage<T>::get(p + i + j);
    return v;
}

template <class T>
inline void store_lanes(void* out, int64_t i, int lanes, vd v) {
    T* p = static_cast<T*>(out) + i;
    if (lanes == W) { Storage<T>::storew(p, v); return; }
    for (int j = 0; j < lanes; ++j) Storage<T>::put(p + j, v[j]);
}

// c * v, except that a zero coefficient times an infinite value is 0: the term is absent.
inline vd scaled(vd c, vd v) { return select((c == 0.0) & isinf_v(v), splat(0.0), c * v); }

template <class T>
ChunkResult exact_chunk(const Args& a, int64_t begin, int64_t end) {
    constexpr int V = B / W;  // vectors per block
    const T* x = static_cast<const T*>(a.x);
    const T* y = static_cast<const T*>(a.y);
    const T* g = static_cast<const T*>(a.grad_output);
    const bool logits = a.kind == LOGITS;
    const bool need_loss = a.loss || a.want_sum;
    const bool need_tail = need_loss || (a.grad_target && a.p);
    const bool has_w = a.w != nullptr, has_p = a.p != nullptr;
    const double s = a.label_smoothing;
    const bool nan_ignore = a.has_ignore && std::isnan(a.ignore_index);
    WeightReader<T> wr(a.w, a.w_mode, a.w_inner, begin), pr(a.p, a.p_mode, a.p_inner, begin);
    vd X[V], Y[V], A[V], E[V], TL[V], WV[V], PV[V];
    vl KEPT[V];
    const vd zero = splat(0.0);
    vd acc = zero;
    int64_t kept_total = 0;
    vl bad_x = splat_l(0), bad_y = splat_l(0);

    for (int64_t base = begin; base < end; base += B) {
        const int64_t count = end - base < B ? end - base : B;
        // stage 1: load, targets (ignore mask, label smoothing)
        for (int v = 0; v < V; ++v) {
            const int64_t i = base + int64_t(v) * W;
            const int64_t left = count - int64_t(v) * W;
            const int lanes = left >= W ? W : (left > 0 ? int(left) : 0);
            vd xv = load_lanes(x, i, lanes, 0.5), yv = load_lanes(y, i, lanes, 0.5);
            if (has_w) WV[v] = wr.next(i, lanes);
            if (has_p) PV[v] = pr.next(i, lanes);
            const vl valid = lane_index() < lanes;
            vl kept = valid;
            if (a.has_ignore) {
                kept &= nan_ignore ? (yv == yv) : (yv != a.ignore_index);
                yv = select(kept, yv, zero);
            }
            if (!logits) {  // the [0, 1] checks of the probability loss (NaN fails both comparisons)
                bad_x |= valid & ~((xv >= 0.0) & (xv <= 1.0));
                bad_y |= kept & ~((yv >= 0.0) & (yv <= 1.0));
            }
            if (s != 0.0) yv = yv * (1.0 - s) + 0.5 * s;
            X[v] = xv;
            Y[v] = yv;
            KEPT[v] = kept;
        }
        // stage 2: the transcendental functions
        // A block whose logits are all finite with |x| <= 700 (the usual case) takes shorter formulas:
        // no NaN or infinity to propagate, no 0 * inf to avoid, no exp underflow to flush.
        bool finite = true;
        if (logits) {
            vl ok = splat_l(-1);
            for (int v = 0; v < V; ++v) {
                const vd ax = select(X[v] < 0.0, -X[v], X[v]);
                ok &= ax <= 700.0;  // false for NaN
                A[v] = ax;
            }
            for (int j = 0; j < W; ++j) finite &= ok[j] != 0;
            if (finite) {
                for (int v = 0; v < V; ++v) E[v] = exp_neg_finite(A[v]);
            } else {
                for (int v = 0; v < V; ++v) E[v] = exp_neg(select(isnan_v(X[v]), X[v], A[v]));
            }
            if (need_tail)
                for (int v = 0; v < V; ++v) TL[v] = log1p_unit(E[v]);
        } else {
            for (int v = 0; v < V; ++v) log_pair(X[v], E[v], TL[v]);  // log(x), log1p(-x)
        }
        // stage 3: loss and gradients, weights, mask, stores
        for (int v = 0; v < V; ++v) {
            const int64_t i = base + int64_t(v) * W;
            const int64_t left = count - int64_t(v) * W;
            if (left <= 0) break;
            const int lanes = left >= W ? W : int(left);
            const vd xv = X[v], yv = Y[v];
            const vl kept = KEPT[v];
            vd loss = zero, gi = zero, gt = zero;
            if (logits) {
                const vd e = E[v];
                const vd positive = has_p ? PV[v] * yv : yv;
                const vl nonneg = xv >= 0.0;
                if (need_tail && finite) {
                    // p y sp(-x) + (1 - y) sp(x) = c |x| + (p y + 1 - y) tail, c = 1 - y (x >= 0) or p y
                    const vd one_minus_y = 1.0 - yv;
                    const vd c = select(nonneg, one_minus_y, positive);
                    loss = c * A[v] + (positive + one_minus_y) * TL[v];
                    gt = has_p ? PV[v] * (select(nonneg, zero, A[v]) + TL[v]) - (select(nonneg, A[v], zero) + TL[v])
                               : -xv;
                } else if (need_tail) {
                    const vd sp_neg = vmax0(-xv) + TL[v], sp_pos = vmax0(xv) + TL[v];  // sp(-x), sp(x)
                    loss = scaled(positive, sp_neg) + scaled(1.0 - yv, sp_pos);
                    gt = has_p ? scaled(PV[v], sp_neg) - sp_pos : -xv;
                } else {
                    gt = -xv;
                }
                if (a.grad_input) {
                    const vd large = 1.0 / (1.0 + e), small = e * large;  // s(|x|), s(-|x|)
                    gi = (1.0 - yv) * select(nonneg, large, small) - positive * select(nonneg, small, large);
                    if (!finite) gi = select(isnan_v(xv), xv, gi);
                }
            } else {
                const vd log_x = E[v], log_1mx = TL[v];
                loss = yv * vmin(-log_x, 100.0) + (1.0 - yv) * vmin(-log_1mx, 100.0);
                gt = log_1mx - log_x;
                if (a.grad_input) {
                    vd denom = xv * (1.0 - xv);
                    denom = select(denom > GRAD_EPSILON, denom, splat(GRAD_EPSILON));
                    gi = (xv - yv) / denom;
                }
            }
            if (need_loss) {
                if (has_w) loss = loss * WV[v];
                loss = select(kept, loss, zero);
                if (a.loss) store_lanes<T>(a.loss, i, lanes, loss);
                if (a.want_sum) acc += loss;  // padded lanes are not kept: they add 0
            }
            if (a.grad_input || a.grad_target) {
                vd scale = splat(a.grad_scale);
                if (g) scale = load_lanes(g, i, lanes, 0.0) * a.grad_scale;
                if (a.grad_input) {
                    if (has_w) gi = gi * WV[v];
                    store_lanes<T>(a.grad_input, i, lanes, select(kept, gi, zero) * scale);
                }
                if (a.grad_target) {
                    if (s != 0.0) gt = gt * (1.0 - s);
                    if (has_w) gt = gt * WV[v];
                    store_lanes<T>(a.grad_target, i, lanes, select(kept, gt, zero) * scale);
                }
            }
            if (a.has_ignore)
                for (int j = 0; j < lanes; ++j) kept_total += kept[j] ? 1 : 0;
        }
    }
    ChunkResult r;
    double total = 0.0;  // lanes in a fixed order
    for (int j = 0; j < W; ++j) total += acc[j];
    r.sum = (long double)total;
    r.kept = a.has_ignore ? kept_total : end - begin;
    for (int j = 0; j < W; ++j) {
        r.bad_input |= bad_x[j] != 0;
        r.bad_target |= bad_y[j] != 0;
    }
    return r;
}

// For tests: apply one of the vector functions to n doubles (n a multiple of W not required).
inline bool elementwise_impl(const char* name, const double* in, double* out, int64_t n) {
    vd (*fn)(vd) = nullptr;
    const std::string_view f(name);
    if (f == "exp_neg") fn = &exp_neg;
    else if (f == "log1p_unit") fn = &log1p_unit;
    else if (f == "log_unit") fn = &log_unit;
    else if (f == "log1p_reduced") fn = &log1p_reduced;
    else if (f == "log_x") fn = [](vd x) { vd a, b; log_pair(x, a, b); return a; };
    else if (f == "log1p_neg_x") fn = [](vd x) { vd a, b; log_pair(x, a, b); return b; };
    if (!fn) return false;
    for (int64_t i = 0; i < n; i += W) {
        vd v = splat(0.5);
        const int64_t lanes = n - i < W ? n - i : W;
        for (int64_t j = 0; j < lanes; ++j) v[j] = load_bits<double>(in + i + j);
        v = fn(v);
        for (int64_t j = 0; j < lanes; ++j) store_bits(out + i + j, double(v[j]));
    }
    return true;
}

#include "fast_kernel.h"

inline ChunkFn vector_kernel_impl(int dtype) {
    switch (dtype) {
        case F32: return &fast_chunk<float>;
        case F16: return &fast_chunk<half_t>;
        case BF16: return &fast_chunk<bf16_t>;
        default: return nullptr;
    }
}

}  // namespace BCEKIT_ISA
}  // namespace bcekit
