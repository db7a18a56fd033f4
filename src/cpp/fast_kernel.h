// The fast path of the vector kernel: reduced losses and input gradients of float, float16 and bfloat16
// data in one pass, for the cases a training step takes (the exact path of vector_kernel.h serves the
// rest: per-element losses, target gradients, and blocks holding non-finite or out-of-range values).
//
// Included by vector_kernel.h inside namespace BCEKIT_ISA, after the exact path it falls back to.
//
// What is computed, per element (y smoothed, ignored elements masked, w = weight, p = pos_weight):
//   logits         e = exp(-|x|), s(x) = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0
//                  grad  = w ((1 - y) s(x) - p y s(-x))                       (double lanes, rounded once)
//                  loss  = w (c |x| + (p y + 1 - y) log1p(e)),  c = 1 - y (x >= 0) or p y (x < 0)
//   probabilities  grad  = w (x - y) / max(x (1 - x), 1e-12)                  (see Precision)
//                  loss  = -w (y max(log x, -100) + (1 - y) max(log(1 - x), -100))
//
// Precision. The logits gradient is formed in double from a double exp(-|x|) (2^-38.7), the exact
// path's formula, so the cancellation near s(x) = y is that of a double evaluation. The probability
// loss's gradient has no such cancellation: x - y of two floats is exact wherever it cancels (Sterbenz),
// so without options or weights it is formed in float lanes, as torch forms it, within 3.5 ulp (with
// them, in double as the exact path). The loss only feeds the sum here (the exact path writes
// per-element losses), which allows cheaper logarithms:
//   * logits without weights: the sum of log1p(e) is -log of the product of r = 1 / (1 + e), which the
//     gradient computes anyway: one multiplication per element, one logarithm per lane and chunk
//     (LogProduct). Elements with e < 2^-27 add e instead (r would round it away).
//   * logits with one weight per run (a scalar; a row's weight) or per class (16 to 2048 classes, a
//     multiple of 8), no pos_weight: the same product per run, or per class and chunk (ClassProducts,
//     one vector logarithm per 4 classes when the chunk ends), its logarithm times the weight.
//   * logits with a per-class pos_weight p >= 1/2 (a scalar weight at most), no smoothing, 0/1 targets:
//     the term p log1p(e) of y = 1 is log1p(e) + (p - 1) log1p(e), the first in the chunk's product, the
//     second in its class's product over the targets 1 (a block of other targets makes the rest of the
//     chunk take the per-element form below).
//   * logits with other weights: log1p(e) = [e > 1/2] ln2 + f + f^2 R(f) per element, f exact in double and
//     only the polynomial R in float lanes (its rounding reaches the result scaled by f^2 R <= 0.2 of it).
//   * probabilities: log x and log(1 - x) in float lanes (about an ulp each), combined in double.
//   * probabilities without weights or options, a block whose targets are all 0 or 1 (labels, the common
//     case): the sum of -log q, q = x or 1 - x, as -log of a product (probabilities_hard_block), half the
//     instructions of the two logarithms. With a weight and no options, the same product per run of one
//     weight or per class (probabilities_weighted_hard_block), its logarithm times the weight.
// Every element's contribution to the sum is within 2 ulp of its exact float32 loss (tests/
// test_fast_kernel.py checks each formulation against mpmath, element by element); sums are in double.
//
// Speed. The pass is bound by instruction count, and a double exp costs 15 instructions per 4 lanes.
// A block of FAST_BLOCK elements runs through stages that are software-pipelined: iteration k runs
// stage 1 on group k, then stages 2 and 3 on group k - SKEW (a group is 8 elements). Independent chains
// side by side keep the FMA, add/convert and divide units busy together: one long chain per element
// (exp, a division, a logarithm) stalls on latency, and a separate loop per stage leaves all but one
// unit idle. (Stage 2 on group k - SKEW and stage 3 on k - 2 SKEW measured 1.5% slower for the logits.)
//   logits         1. exp(-|x|) (double)   2. 1 / (1 + e), f and R(f) for weighted sums   3. the rest
//   probabilities  1. log x, log(1 - x) (float)                                            3. the rest
// (the hard-target block is one plain loop: it has one short chain per group, the running product).
// Inputs are prefetched ahead of stage 1. Blocks are checked as they stream (logits: |x| <= 700 and not
// NaN; probabilities: x and the kept y in [0, 1], x zero or normal): a block that fails is recomputed
// whole by the exact path, which also reports range errors.
//
// float32 gradients larger than the last-level cache are written with streaming (non-temporal) stores
// when the caller asks (Args::stream_outputs): they skip reading in lines that are overwritten whole.

// ---------------------------------------------------------------------------------------------------
// Lanes: 8 floats, or two halves of 4 doubles
// ---------------------------------------------------------------------------------------------------

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint64_t vq __attribute__((vector_size(32)));

BCEKIT_INLINE vf8 splat8(float v) { return vf8{} + v; }
BCEKIT_INLINE vd abs4(vd a) { return (vd)((vq)a & 0x7fffffffffffffffULL); }
BCEKIT_INLINE vf8 abs8(vf8 a) { return (vf8)((vu8)a & 0x7fffffffu); }

#if defined(__AVX2__)
BCEKIT_INLINE vd lo4(vf8 v) { return (vd)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v)); }
BCEKIT_INLINE vd hi4(vf8 v) { return (vd)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1)); }
BCEKIT_INLINE vf8 join8(vd lo, vd hi) {
    return (vf8)_mm256_set_m128(_mm256_cvtpd_ps((__m256d)hi), _mm256_cvtpd_ps((__m256d)lo));
}
// Lanes of `neg` where the sign bit of m is set, else `pos` (one blend; no comparison needed).
BCEKIT_INLINE vd pick_neg(vd m, vd neg, vd pos) {
    return (vd)__builtin_ia32_blendvpd256((__v4df)pos, (__v4df)neg, (__v4df)m);
}
BCEKIT_INLINE vf8 pick_neg8(vf8 m, vf8 neg, vf8 pos) {
    return (vf8)__builtin_ia32_blendvps256((__v8sf)pos, (__v8sf)neg, (__v8sf)m);
}
BCEKIT_INLINE int count_set(vf8 mask) { return __builtin_popcount(unsigned(_mm256_movemask_ps((__m256)mask))); }
BCEKIT_INLINE vd max4(vd a, vd b) { return (vd)_mm256_max_pd((__m256d)a, (__m256d)b); }  // b if a is NaN
BCEKIT_INLINE vf8 max8(vf8 a, vf8 b) { return (vf8)_mm256_max_ps((__m256)a, (__m256)b); }
#else
BCEKIT_INLINE vd lo4(vf8 v) { return vd{v[0], v[1], v[2], v[3]}; }
BCEKIT_INLINE vd hi4(vf8 v) { return vd{v[4], v[5], v[6], v[7]}; }
BCEKIT_INLINE vf8 join8(vd lo, vd hi) {
    return vf8{float(lo[0]), float(lo[1]), float(lo[2]), float(lo[3]),
               float(hi[0]), float(hi[1]), float(hi[2]), float(hi[3])};
}
BCEKIT_INLINE vd pick_neg(vd m, vd neg, vd pos) { return (vl)m < 0 ? neg : pos; }
BCEKIT_INLINE vd max4(vd a, vd b) { return a > b ? a : b; }
BCEKIT_INLINE vf8 max8(vf8 a, vf8 b) { return a > b ? a : b; }
BCEKIT_INLINE vf8 pick_neg8(vf8 m, vf8 neg, vf8 pos) { return (vi8)m < 0 ? neg : pos; }
BCEKIT_INLINE int count_set(vf8 mask) {
    int n = 0;
    const vi8 bits = (vi8)mask;
    for (int j = 0; j < 8; ++j) n += bits[j] < 0;
    return n;
}
#endif

// Storage of 8 elements as floats (half types widened exactly), and of 4 doubles rounded to storage.
template <class T> struct Lanes;
template <> struct Lanes<float> {
    BCEKIT_INLINE static vf8 load(const float* p) { vf8 v; std::memcpy(&v, p, sizeof v); return v; }
    template <bool STREAM>
    BCEKIT_INLINE static void store8(float* p, vf8 v) {
#if defined(__AVX2__)
        // Streaming stores need a 32-byte aligned p: Args::stream_outputs is only set for a 32-byte
        // aligned grad_input (core.cpp), and the groups start a multiple of 8 floats past it.
        if constexpr (STREAM) _mm256_stream_ps(p, (__m256)v);
        else _mm256_storeu_ps(p, (__m256)v);
#else
        std::memcpy(p, &v, sizeof v);
#endif
    }
};
// Half types are stored through the exact path's rounding (float, then the half type: as torch rounds
// its float32 results); no streaming stores for them.
template <class H>
struct HalfStores {
    template <bool>
    BCEKIT_INLINE static void store(H* p, vd v) { Storage<H>::storew(p, v); }
    template <bool>
    BCEKIT_INLINE static void store8(H* p, vf8 v) {
        Storage<H>::storew(p, lo4(v));
        Storage<H>::storew(p + 4, hi4(v));
    }
};
template <> struct Lanes<half_t> : HalfStores<half_t> {
    BCEKIT_INLINE static vf8 load(const half_t* p) {
#if defined(__AVX2__)
        return (vf8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
        uint16_t bits[8];
        std::memcpy(bits, p, sizeof bits);
        vf8 v;
        for (int j = 0; j < 8; ++j) v[j] = half_to_float(bits[j]);
        return v;
#endif
    }
};
template <> struct Lanes<bf16_t> : HalfStores<bf16_t> {
    BCEKIT_INLINE static vf8 load(const bf16_t* p) {
#if defined(__AVX2__)
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return (vf8)_mm256_slli_epi32(wide, 16);
#else
        uint16_t bits[8];
        std::memcpy(bits, p, sizeof bits);
        vf8 v;
        for (int j = 0; j < 8; ++j) v[j] = bf16_to_float(bits[j]);
        return v;
#endif
    }
};

// A group's 8 results, computed as two halves of double lanes: float storage takes them as one 32-byte
// store (streaming ones are 32 bytes wide, so each writes half a cache line whole).
template <class T, bool STREAM>
BCEKIT_INLINE void store_halves(T* p, vd lo, vd hi) {
    if constexpr (std::is_same<T, float>::value) {
        Lanes<float>::template store8<STREAM>(p, join8(lo, hi));
    } else {
        Lanes<T>::template store<STREAM>(p, lo);
        Lanes<T>::template store<STREAM>(p + 4, hi);
    }
}

// ---------------------------------------------------------------------------------------------------
// Float logarithms for the summed loss
// ---------------------------------------------------------------------------------------------------

// log1p(f) = f + f^2 R(f) for f in [-0.2929, 0.5]: R a degree-9 Chebyshev fit in float (relative error
// of log1p 2^-28 before rounding), in Estrin's scheme for a short dependency chain. Only R is rounded to
// float: its error reaches log1p(f) scaled by f^2 R / log1p(f) <= 0.2.
BCEKIT_INLINE vf8 log1p_tail_f(vf8 f) {
    const vf8 f2 = f * f, f4 = f2 * f2, f8 = f4 * f4;
    const vf8 r01 = f * 0.33333322405815125f - 0.5f;
    const vf8 r23 = f * 0.20001578330993652f - 0.250002384185791f;
    const vf8 r45 = f * 0.14221224188804626f - 0.1665576547384262f;
    const vf8 r67 = f * 0.12082738429307938f - 0.12619036436080933f;
    const vf8 r89 = f * 0.04905814304947853f - 0.10493273288011551f;
    return r89 * f8 + ((r67 * f2 + r45) * f4 + (r23 * f2 + r01));
}

// For log1p(e), e = exp(-|x|) in [0, 1]: 1 + e = 2 (1 + (e - 1) / 2) above 1/2, where (e - 1) / 2 in
// [-1/4, 0] is exact; below, f = e. The reduced argument stays in double (a float would lose e's digits,
// and e below 2^-126 altogether); only R(f) runs in float lanes. log1p(e) = [e > 1/2] ln2 + f + f^2 R(f).
BCEKIT_INLINE vd log1p_unit_argument(vd e) { return e > 0.5 ? e * 0.5 - 0.5 : e; }

constexpr float LN2_F = 0.693147182464599609375f;  // float(ln 2): 0.03 ulp from ln 2

// log1p(f) for f in [-0.2929, 0.4142] in float: f + f^2 R8(f), R8 a degree-8 Chebyshev fit (relative
// error 2^-26 before rounding), rounded once by the last FMA: under an ulp. (log1p_tail_f's wider range
// costs a degree more; the probability loss, with two of these per element, measured 4% slower with it.)
BCEKIT_INLINE vf8 log1p_narrow_f(vf8 f) {
    const vf8 f2 = f * f, f4 = f2 * f2, f8 = f4 * f4;
    const vf8 r01 = f * 0.3333333134651184f - 0.4999999701976776f;
    const vf8 r23 = f * 0.20001234114170074f - 0.2500078082084656f;
    const vf8 r45 = f * 0.14204855263233185f - 0.16626645624637604f;
    const vf8 r67 = f * 0.12722672522068024f - 0.13127554953098297f;
    const vf8 r = -0.07673641294240952f * f8 + ((r67 * f2 + r45) * f4 + (r23 * f2 + r01));
    return f2 * r + f;
}

// u = 2^k (1 + f) for normal positive floats u, 1 + f in [sqrt(1/2), sqrt(2)): integer arithmetic on
// the bits (subtracting sqrt(1/2)'s bits moves the binade boundary there); f = m - 1 is exact.
BCEKIT_INLINE void decompose_f(vf8 u, vf8& k, vf8& f) {
    const vu8 shifted = (vu8)u - 0x3f3504f3u;  // bits of sqrt(1/2); unsigned: lanes the block check
                                                // rejects (negative x) would overflow a signed subtraction
    k = __builtin_convertvector((vi8)shifted >> 23, vf8);  // arithmetic shift: k < 0 below sqrt(1/2)
    f = (vf8)((shifted & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
}

// max(log x, -100) and max(log(1 - x), -100) for x in {0} U [2^-126, 1] (the block check), from the
// smaller and the larger of x and 1 - x, both reduced exactly: m = min(x, 1 - x) is exact (1 - x is, by
// Sterbenz, for x >= 1/2), and log m takes the full decomposition; log(1 - m) = log1p(-m) on -m itself for
// m <= 0.2929, else -ln 2 + log1p(1 - 2m), 1 - 2m in [0, 0.4142] exact (Sterbenz again: 2m in [0.59, 1]).
// Forming 1 - x where it rounds (x < 1/2) is never needed. The clamp only ever acts at m = 0 (x = 0 or
// 1), since the smallest normal float's log is -87.3 and 1 - x >= 2^-24 for x < 1; lanes where it does
// are set in `edge`. INTERIOR: the caller has checked that no x is 0 or 1, so there is no clamp.
template <bool INTERIOR = false>
BCEKIT_INLINE void log_pair_f(vf8 x, vf8& log_x, vf8& log_1mx, vu8& edge) {
    const vi8 upper = x > 0.5f;
    const vf8 m = upper ? 1.0f - x : x;
    vf8 k, f;
    decompose_f(m, k, f);
    vf8 log_m = k * LN2_F + log1p_narrow_f(f);
    if constexpr (!INTERIOR) {
        const vi8 zero = m == 0.0f;
        edge |= (vu8)zero;
        log_m = zero ? splat8(-100.0f) : log_m;
    }
    const vi8 near_zero = m <= 0.29289322f;
    const vf8 f_rest = near_zero ? -m : 1.0f - 2.0f * m;
    const vf8 offset = (vf8)((vi8)splat8(-LN2_F) & ~near_zero);  // -ln 2, or 0 where f_rest = -m
    const vf8 log_rest = offset + log1p_narrow_f(f_rest);          // log(1 - m)
    log_x = upper ? log_rest : log_m;
    log_1mx = upper ? log_m : log_rest;
}

// Input and target PREFETCH_BYTES ahead of stage 1: the stages' dependency chains leave the out-of-order
// window too little room to hide a load that misses the caches, and the hardware prefetchers alone fell
// behind (a 2^20-element pass ran 1.5x slower than the same pass on data in L1).
constexpr int PREFETCH_BYTES = 2048;
template <class T>
BCEKIT_INLINE void prefetch(const T* x, const T* y) {
    __builtin_prefetch(reinterpret_cast<const char*>(x) + PREFETCH_BYTES, 0, 3);
    __builtin_prefetch(reinterpret_cast<const char*>(y) + PREFETCH_BYTES, 0, 3);
}

// ---------------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------------

constexpr int FAST_BLOCK = 512;  // elements per block: a multiple of 8, stage buffers ~14 KiB in L1
constexpr int GROUPS = FAST_BLOCK / 8;
constexpr int SKEW = 2;          // groups between stage 1 and the later stages

struct Scratch {
    vd X[2 * GROUPS], E[2 * GROUPS], R[2 * GROUPS];  // x, exp(-|x|), 1 / (1 + exp(-|x|)) (logits)
    vd F[2 * GROUPS];                 // the reduced argument of log1p(e) (logits)
    vf8 L1[GROUPS], L2[GROUPS];       // R(f) of log1p(e) (logits); log x, log(1 - x) (probabilities)
    float w[FAST_BLOCK], p[FAST_BLOCK];
    double B[FAST_BLOCK];             // each element's factor of its class's product (logits, modes 5, 6)
    bool soft = false;                // mode 6: the block stopped at a kept target other than 0 or 1
};

// The weight values of elements [begin, begin + len) as floats, for the broadcast forms other than
// SCALAR (which the kernel splats) and ABSENT.
template <class T>
void fill_weights(const void* data, int mode, int64_t inner, int64_t begin, int len, float* out) {
    const T* w = static_cast<const T*>(data);
    inner = inner > 0 ? inner : 1;
    if (mode == FULL) {
        for (int j = 0; j < len; ++j) out[j] = float(Storage<T>::get(w + begin + j));
        return;
    }
    int64_t col = begin % inner, row = begin / inner;
    for (int j = 0; j < len;) {
        const int run = int(std::min<int64_t>(inner - col, len - j));  // elements until the row ends
        if (mode == PER_CLASS) {
            for (int r = 0; r < run; ++r) out[j + r] = float(Storage<T>::get(w + col + r));
        } else {
            const float v = float(Storage<T>::get(w + row));
            for (int r = 0; r < run; ++r) out[j + r] = v;
        }
        j += run;
        col = 0;
        ++row;
    }
}

// The options of one pass, read once per chunk.
struct FastOptions {
    bool sum, grad, stream, smooth, ignore, nan_ignore, grad_output;
    int w_mode, p_mode;
    float w_scalar, p_scalar;
    double s, ignore_index, scale;
    template <class T>
    FastOptions(const Args& a, const T*)
        : sum(a.want_sum), grad(a.grad_input != nullptr), stream(a.stream_outputs && a.grad_input),
          smooth(a.label_smoothing != 0.0), ignore(a.has_ignore),
          nan_ignore(a.has_ignore && std::isnan(a.ignore_index)), grad_output(a.grad_output != nullptr),
          w_mode(a.w ? a.w_mode : ABSENT), p_mode(a.p ? a.p_mode : ABSENT),
          w_scalar(w_mode == SCALAR ? float(Storage<T>::get(static_cast<const T*>(a.w))) : 1.0f),
          p_scalar(p_mode == SCALAR ? float(Storage<T>::get(static_cast<const T*>(a.p))) : 1.0f),
          s(a.label_smoothing), ignore_index(a.ignore_index), scale(a.grad_scale) {
        // a finite ignore_index that no float equals ignores nothing (the exact path compares in double)
        if (ignore && !nan_ignore && double(float(ignore_index)) != ignore_index) ignore = false;
    }
    bool plain() const { return !smooth && !ignore && !grad_output && w_mode == ABSENT && p_mode == ABSENT; }
};

// Targets of group k, half h: ignore mask from the raw target, then label smoothing (as the exact path).
BCEKIT_INLINE vd half_target(const FastOptions& o, vf8 y8, vf8 kept8, int h, vd& kept_mask, bool ignore) {
    vd y = h ? hi4(y8) : lo4(y8);
    if (ignore) {
        const vd kept = h ? hi4(kept8) : lo4(kept8);  // -1.0f or 0.0f, widened: sign bit set where kept
        kept_mask = kept;
        y = pick_neg(kept, y, splat(0.0));
    }
    if (o.smooth) y = y * (1.0 - o.s) + 0.5 * o.s;
    return y;
}

BCEKIT_INLINE vf8 kept_lanes(const FastOptions& o, vf8 y8, bool ignore) {
    if (!ignore) return splat8(-1.0f);
    const vf8 kept = o.nan_ignore ? (vf8)(y8 == y8) : (vf8)(y8 != float(o.ignore_index));
    return (vf8)((vi8)kept & (vi8)splat8(-1.0f));  // -1.0f (sign set) where kept, +0.0f elsewhere
}

// A weight's values for half h of group k (double lanes).
BCEKIT_INLINE vd half_weight(int mode, float scalar, const float* buffer, int k, int h) {
    if (mode == ABSENT) return splat(1.0);
    if (mode == SCALAR) return splat(double(scalar));
    vf8 v;
    std::memcpy(&v, buffer + 8 * k, sizeof v);
    return h ? hi4(v) : lo4(v);
}

// log1p(e) for half h of group k from stage 2's f and R(f): [e > 1/2] ln2 + f + f^2 R(f), in double.
BCEKIT_INLINE vd log1p_unit(const Scratch& s, int k, int h, vd e, vd ln2) {
    const vd f = s.F[2 * k + h], r = h ? hi4(s.L1[k]) : lo4(s.L1[k]);
    return (f * f) * r + f + (vd)((vq)(e > 0.5) & (vq)ln2);
}

// Sum of log1p(e) over the elements of a chunk without weights, as -log of a product: log1p(e) = -log r
// with r = 1 / (1 + e), which the gradient needs anyway, so a multiplication per element replaces a
// logarithm, and one logarithm per lane is taken at the end of the chunk. r rounds 1 + e, an absolute
// error of 2^-53 in -log r, 2^-26 relative at most for e >= 2^-27; smaller e are added directly
// (log1p(e) = e to 2^-28 relative). Blocks multiply into per-lane products that stay above 2^-128 (64
// factors of at least 1/2 each); fold() moves their exponent into an integer before the next block.
struct LogProduct {
    vd mantissa = splat(1.0);  // in [1, 2) after each fold
    vl exponent{};
    // multiply in a block's product (>= 2^-128: at most 64 factors of at least 1/2 per lane)
    void fold(vd product) {
        typedef uint64_t vq_ __attribute__((vector_size(8 * W)));
        const vq_ bits = (vq_)(mantissa * product);
        exponent += (vl)(bits >> 52) - 1023;
        mantissa = (vd)((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
    }
    // multiply in mantissa * 2^exponent, mantissa of either sign and at least 2^-900 in magnitude
    void absorb(vd other_mantissa, vl other_exponent) {
        exponent += other_exponent;
        fold(abs4(other_mantissa));
    }
    // sum over the lanes of log(mantissa * 2^exponent)
    long double log() const {
        long double total = 0.0L;
        for (int j = 0; j < W; ++j) total += std::log((long double)mantissa[j]) + exponent[j] * LN2_L;
        return total;
    }
    // the same sum from one logarithm (in double, for the short runs of one weight of logits_block's mode
    // 4): the lanes' mantissas multiplied together (three more roundings of 2^-53, as three more factors),
    // written 2^j g with g in [sqrt(1/2), sqrt(2)), and log g = log1p(g - 1), g - 1 exact: no cancellation
    // against j ln 2 where the product is near a power of 2 (r near 1/2 or 1)
    long double log_combined() const {
        double m = 1.0;
        int64_t k = 0;
        for (int j = 0; j < W; ++j) {
            m *= mantissa[j];  // below 2^W
            k += exponent[j];
        }
        int j;
        double g = std::frexp(m, &j);  // in [1/2, 1)
        if (g < 0.70710678118654752) {
            g *= 2.0;
            --j;
        }
        return (long double)std::log1p(g - 1.0) + (long double)(k + j) * LN2_L;
    }
    static constexpr long double LN2_L = 0.693147180559945309417232121458176568L;
};

// Classes of a per-class weight (logits, mode 5) or pos_weight (mode 6) whose log1p(e) terms are summed
// as products, one per class. A chunk may hold at most MAX_FACTORS factors (each at least 1/2) per class, so that a product
// stays above 2^-1000 with no renormalisation, and at least MIN_CLASSES classes; at most MAX_CLASSES, so
// that a chunk's logarithms (one vector logarithm per 4 classes) are few against its elements.
constexpr int64_t MIN_CLASSES = 16, MAX_CLASSES = 2048, MAX_FACTORS = 1000;

// log of products in [2^-1000, 1]: P = 2^k m with m in [sqrt(1/2), sqrt(2)), m - 1 exact, and log m =
// 2 atanh(u), u = (m - 1) / (m + 1) in [-0.1716, 0.1716], as 2u (1 + u^2/3 + ... + u^18/19): the series'
// remainder is below 2^-56 relative, the roundings of u (two) and of the series about 2^-52.
BCEKIT_INLINE vd log_product(vd P) {
    typedef uint64_t vq_ __attribute__((vector_size(8 * W)));
    const vq_ bits = (vq_)P;
    vl k = (vl)(bits >> 52) - 1023;
    vd m = (vd)((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);  // [1, 2)
    const vl big = m > 1.4142135623730951;
    m = big ? m * 0.5 : m;
    k -= big;  // big is -1 where set
    const vd u = (m - 1.0) / (m + 1.0), u2 = u * u;
    vd series = splat(1.0 / 19);
    for (int j = 17; j >= 1; j -= 2) series = series * u2 + 1.0 / j;
    return (2.0 * u) * series + __builtin_convertvector(k, vd) * LN2;
}

// The class products of one chunk, P[c] over the kept elements of class c (mode 5), or over its kept
// elements of target 1 (mode 6).
struct ClassProducts {
    double P[MAX_CLASSES];
    int64_t E[MAX_CLASSES];  // the product is P 2^E (E moves only in merge_factors, the probabilities')
    int64_t classes = 0;
    int64_t pending = 0;     // probabilities: elements merged since the last normalise()
    void reset(int64_t c) {
        classes = c;
        pending = 0;
        for (int64_t j = 0; j < c; ++j) {
            P[j] = 1.0;
            E[j] = 0;
        }
    }
    // as merge, for factors of at least 2^-126 (the probability loss's q): 7 of them and a P in [1, 2) stay
    // above 2^-882, so the factors go in pieces of at most 7 rows since the last normalise(), which moves
    // each P's exponent to E (an exact scaling: the products keep their bits)
    void merge_factors(const double* factors, int64_t column, int len) {
        for (int j = 0; j < len;) {
            if (pending == 7 * classes) normalise();
            const int piece = int(std::min<int64_t>(len - j, 7 * classes - pending));
            merge(factors + j, (column + j) % classes, piece);
            pending += piece;
            j += piece;
        }
    }
    void normalise() {
        for (int64_t c = 0; c < classes; c += W) {
            vd a;
            vl e;
            std::memcpy(&a, P + c, sizeof a);
            std::memcpy(&e, E + c, sizeof e);
            const vq bits = (vq)a;
            e += (vl)(bits >> 52) - 1023;
            a = (vd)((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
            std::memcpy(P + c, &a, sizeof a);
            std::memcpy(E + c, &e, sizeof e);
        }
        pending = 0;
    }
    // multiply in `len` factors (a block's Scratch::B) from class `column` on
    void merge(const double* factors, int64_t column, int len) {
        for (int j = 0; j < len; j += 8) {
            for (int h = 0; h < 8; h += W) {
                vd a, b;
                std::memcpy(&a, P + column + h, sizeof a);
                std::memcpy(&b, factors + j + h, sizeof b);
                a *= b;
                std::memcpy(P + column + h, &a, sizeof a);
            }
            column += 8;
            if (column == classes) column = 0;
        }
    }
};

// Whether any lane of a block's accumulated "bad" mask is set.
BCEKIT_INLINE bool any_set(vu8 bad) {
    unsigned any = 0;
    for (int j = 0; j < 8; ++j) any |= bad[j];
    return any != 0;
}

// Lanes whose probability x the fast path cannot take: outside [+0, 1], NaN, or subnormal (-0.0 too:
// the exact path takes it).
BCEKIT_INLINE vu8 bad_probabilities(vf8 x8) {
    const vu8 xb = (vu8)x8;
    return (vu8)(xb > 0x3f800000u) | ((vu8)(xb < 0x00800000u) & (vu8)(xb != 0u));
}

// The probability loss's gradient without options or weights, in float lanes as torch forms it: x - y
// is exact wherever it cancels (Sterbenz), so it is within 3.5 ulp of exact (tests/test_fast_kernel.py).
// Nothing here can be contracted into an FMA, so every build gives the same bits.
BCEKIT_INLINE vf8 plain_probability_gradient(vf8 x8, vf8 y8, float scale) {
    const vf8 denom = max8((1.0f - x8) * x8, splat8(float(GRAD_EPSILON)));
    return (x8 - y8) / denom * scale;
}

// |x| <= 18 (as float bits): then e = exp(-|x|) >= 1.5e-8 > 2^-27, and no element needs log1p(e) added
// directly (see LogProduct).
constexpr uint32_t BOUNDED_LOGIT_BITS = 0x41900000u;  // 18.0f
constexpr uint32_t MAX_LOGIT_BITS = 0x442f0000u;      // 700.0f

// One block of the logits loss. Returns false (outputs garbage) when a logit is NaN or |x| > 700, or,
// for BOUNDED, |x| > 18.
// MODE: 0 plain; 1 unweighted with label smoothing and/or grad_output; 3 as 1 with ignore_index; 2 with
// weight or pos_weight, per element; 4 with a weight that is one value over the whole block (`run_weight`:
// a SCALAR weight, or a PER_ROW one whose rows cover whole blocks) and no pos_weight; 5 with a PER_CLASS
// weight and no pos_weight; 6 with a PER_CLASS pos_weight, no smoothing and at most a SCALAR weight.
// Modes 0, 1, 3 and 4 sum log1p(e) as a product (LogProduct): in mode 4 the loss w (c |x| + log1p(e)) has
// the one factor w for the whole block, which the caller applies to the block's sum and to the log of
// its product (the product of a run of one weight). Mode 2 weighs each element's log1p(e) = [e > 1/2] ln2
// + f + f^2 R(f), R in float lanes, the rest in double. Mode 4's gradient is mode 2's formula, with w
// splat: the same bits as mode 2 gives it. Mode 5, a per-class weight and no pos_weight (class_form), the
// block starting at class `column` of `classes`: the loss w (c |x| + log1p(e)) has the one factor w per
// class, so each kept element's factor 1 / (1 + e) goes to Scratch::B, for the caller to multiply into its
// class's product (ClassProducts) once the block succeeds, and w c |x| (and w e for a tiny e) to the sum;
// the gradient is w (s(x) - y), as mode 1's times w. Mode 6 (every kept target 0 or 1: a block with another
// returns false and sets Scratch::soft) puts each factor in the block's product and, for y = 1, in
// Scratch::B for its class's; its sum is without the scalar weight, which the caller applies.
// BOUNDED (the product modes with the sum only): every |x| <= 18, so every element's 1 / (1 + e) goes into
// the product and none needs the test e < 2^-27; a block that fails is redone without BOUNDED, which sets
// `has_large` when some |x| > 18 (the next block then starts without BOUNDED). Both give the same bits
// where both apply.
template <class T, int MODE, bool SUM, bool GRAD, bool STREAM, bool BOUNDED = false>
__attribute__((noinline)) bool logits_block(const Args& a, const FastOptions& options, int64_t b, int groups, Scratch& s,
                                             double& sum, vd& product, int64_t& kept_count, bool& has_large,
                                             double run_weight = 1.0, int64_t column = 0, int64_t classes = 0) {
    // a local copy: the stores through gi could alias the options as far as the compiler knows, and
    // every group would read them again
    const FastOptions o = options;
    constexpr bool PLAIN = MODE == 0, WEIGHTED = MODE == 2, RUN = MODE == 4, CLASS = MODE == 5 || MODE == 6;
    constexpr bool POSITIVE = MODE == 6;
    static_assert(!BOUNDED || (!WEIGHTED && SUM), "BOUNDED: the product's sum only");
    constexpr bool TRACK_LARGE = !WEIGHTED && SUM && !BOUNDED;
    const T* x = static_cast<const T*>(a.x) + b;
    const T* y = static_cast<const T*>(a.y) + b;
    const T* go = static_cast<const T*>(a.grad_output) + (a.grad_output ? b : 0);
    T* gi = GRAD ? static_cast<T*>(a.grad_input) + b : nullptr;
    const vd ln2 = splat(LN2);
    const double scale0 = o.scale;
    // ignore_index: known at compile time where it matters most (modes 1 and 3)
    const bool ignore = MODE == 3 || ((WEIGHTED || RUN || CLASS) && o.ignore);
    const T* class_values = static_cast<const T*>(POSITIVE ? a.p : a.w);  // CLASS: the per-class weight or pos_weight
    const bool has_grad_output = !PLAIN && o.grad_output;
    vu8 bad{}, beyond{}, soft{};
    vd acc0{}, acc1{}, prod0 = splat(1.0), prod1 = splat(1.0);
    int64_t kept = 0;

    auto stage1 = [&](int k) __attribute__((always_inline)) {
        prefetch(x + 8 * k, y + 8 * k);
        const vf8 x8 = Lanes<T>::load(x + 8 * k);
        const vu8 magnitude = (vu8)x8 & 0x7fffffffu;
        bad |= (vu8)(magnitude > (BOUNDED ? BOUNDED_LOGIT_BITS : MAX_LOGIT_BITS));  // or NaN
        if constexpr (TRACK_LARGE) beyond |= (vu8)(magnitude > BOUNDED_LOGIT_BITS);
        const vd x0 = lo4(x8), x1 = hi4(x8);
        s.X[2 * k] = x0;
        s.X[2 * k + 1] = x1;
        s.E[2 * k] = exp_neg_finite(abs4(x0));
        s.E[2 * k + 1] = exp_neg_finite(abs4(x1));
    };
    auto stage2 = [&](int k) __attribute__((always_inline)) {
        const vd e0 = s.E[2 * k], e1 = s.E[2 * k + 1];
        s.R[2 * k] = 1.0 / (1.0 + e0);
        s.R[2 * k + 1] = 1.0 / (1.0 + e1);
        if constexpr (SUM && WEIGHTED) {
            const vd f0 = log1p_unit_argument(e0), f1 = log1p_unit_argument(e1);
            s.F[2 * k] = f0;
            s.F[2 * k + 1] = f1;
            s.L1[k] = log1p_tail_f(join8(f0, f1));
        }
    };
    auto stage3 = [&](int k) __attribute__((always_inline)) {
        const vf8 y8 = Lanes<T>::load(y + 8 * k);
        const vf8 kept8 = PLAIN ? splat8(-1.0f) : kept_lanes(o, y8, ignore);
        if (ignore) kept += count_set(kept8);
        vf8 w8, one8;  // CLASS: the group's weights (mode 5) or pos_weights (mode 6); -1.0f where y = 1
        if constexpr (CLASS) {
            w8 = Lanes<T>::load(class_values + column);
            column += 8;
            if (column == classes) column = 0;
        }
        if constexpr (POSITIVE) {
            one8 = (vf8)((vi8)(y8 == 1.0f) & (vi8)splat8(-1.0f));
            soft |= ~((vu8)(y8 == 0.0f) | (vu8)(y8 == 1.0f)) & (vu8)((vi8)kept8 < 0);
        }
        vd out[2];  // the gradient's halves
        for (int h = 0; h < 2; ++h) {
            const vd xv = s.X[2 * k + h], e = s.E[2 * k + h], r = s.R[2 * k + h];
            const vd large = r, small = e * r;  // s(|x|), s(-|x|)
            vd keep = splat(-1.0);
            const vd yv = PLAIN ? (h ? hi4(y8) : lo4(y8)) : half_target(o, y8, kept8, h, keep, ignore);
            // kept lanes of v, `dropped` elsewhere (no blend where nothing is ignored)
            auto masked = [&](vd v, double dropped) __attribute__((always_inline)) {
                return ignore ? pick_neg(keep, v, splat(dropped)) : v;
            };
            if constexpr (POSITIVE) {
                // every kept target 0 or 1, no smoothing, a scalar weight applied to the chunk's sum: the
                // loss is max(x, 0) + log1p(e) for y = 0, p (max(-x, 0) + log1p(e)) for y = 1. log1p(e) goes
                // to the chunk's product (coefficient 1) and, for y = 1, to the class's product too
                // (coefficient p - 1, applied when the chunk ends)
                const vd one = h ? hi4(one8) : lo4(one8);
                const vd pw = pick_neg(one, h ? hi4(w8) : lo4(w8), splat(1.0));  // p y + 1 - y
                vd scale = splat(scale0 * double(o.w_scalar));
                if (has_grad_output) {
                    const vf8 g8 = Lanes<T>::load(go + 8 * k);
                    scale = (h ? hi4(g8) : lo4(g8)) * scale;
                }
                if constexpr (SUM) {
                    const vd positive_part = max4(xv, splat(0.0));
                    vd linear = pick_neg(one, positive_part - xv, positive_part) * pw;
                    vd factor = r;
                    if constexpr (!BOUNDED) {
                        const vl tiny = e < 0x1p-27;
                        linear += (vd)((vl)(e * pw) & tiny);
                        factor = tiny ? splat(1.0) : r;
                    }
                    factor = masked(factor, 1.0);
                    (h ? acc1 : acc0) += masked(linear, 0.0);
                    (h ? prod1 : prod0) *= factor;
                    const vd positive_factor = pick_neg(one, factor, splat(1.0));
                    std::memcpy(s.B + 8 * k + 4 * h, &positive_factor, sizeof positive_factor);
                }
                // (1 - y) s(x) - p y s(-x): s(x) for y = 0, p (s(x) - 1) for y = 1
                if constexpr (GRAD) out[h] = masked((pick_neg(xv, small, large) - yv) * pw, 0.0) * scale;
                continue;
            }
            if constexpr (CLASS) {
                // mode 1's terms times w, except that log1p(e) goes to the class's product as 1 / (1 + e)
                // (its factor w is applied to the product's logarithm when the chunk ends)
                const vd w = h ? hi4(w8) : lo4(w8);
                vd scale = splat(scale0);
                if (has_grad_output) {
                    const vf8 g8 = Lanes<T>::load(go + 8 * k);
                    scale = (h ? hi4(g8) : lo4(g8)) * scale0;
                }
                vd factor = r;
                if constexpr (SUM) {
                    vd linear = pick_neg(xv, yv, 1.0 - yv) * abs4(xv);
                    if constexpr (!BOUNDED) {
                        const vl tiny = e < 0x1p-27;
                        linear += (vd)((vl)e & tiny);
                        factor = tiny ? splat(1.0) : r;
                    }
                    (h ? acc1 : acc0) = masked(linear, 0.0) * w + (h ? acc1 : acc0);
                }
                if constexpr (GRAD) out[h] = masked(pick_neg(xv, small, large) - yv, 0.0) * (w * scale);
                if constexpr (SUM) {
                    factor = masked(factor, 1.0);
                    std::memcpy(s.B + 8 * k + 4 * h, &factor, sizeof factor);
                }
                continue;
            }
            if constexpr (!WEIGHTED) {
                if constexpr (SUM) {
                    // c |x| with c = 1 - y (x >= 0) or y (x < 0), plus log1p(e) as below
                    vd& acc = h ? acc1 : acc0;
                    vd& prod = h ? prod1 : prod0;
                    // plain: c |x| = max(x, 0) - x y, exact (x y and x (1 - y) fit in a double); with
                    // options y is a smoothed double, and c |x| is formed directly (1 - y is exact)
                    const vd linear = PLAIN ? max4(xv, splat(0.0)) - xv * yv : pick_neg(xv, yv, 1.0 - yv) * abs4(xv);
                    if constexpr (BOUNDED) {  // no e below 2^-27
                        acc = PLAIN ? linear + acc : acc + masked(linear, 0.0);
                        prod *= masked(r, 1.0);
                    } else {
                        const vl tiny = e < 0x1p-27;
                        const vd direct = (vd)((vl)e & tiny);  // log1p(e) = e to 2^-28
                        const vd factor = tiny ? splat(1.0) : r;
                        if (PLAIN) {
                            acc = linear + (acc + direct);
                            prod *= factor;
                        } else {
                            acc += masked(linear + direct, 0.0);
                            prod *= masked(factor, 1.0);
                        }
                    }
                }
                if constexpr (GRAD) {
                    vd g;
                    if constexpr (RUN) {  // mode 2's formula: p = 1, w splat
                        const vd one_minus_y = 1.0 - yv;
                        g = (one_minus_y * pick_neg(xv, small, large) - yv * pick_neg(xv, large, small)) *
                            splat(run_weight);
                    } else {
                        g = pick_neg(xv, small, large) - yv;
                    }
                    if (PLAIN) {
                        out[h] = g * scale0;
                    } else {
                        vd scale = splat(scale0);
                        if (has_grad_output) {
                            const vf8 g8 = Lanes<T>::load(go + 8 * k);
                            scale = (h ? hi4(g8) : lo4(g8)) * scale0;
                        }
                        out[h] = masked(g, 0.0) * scale;
                    }
                }
                continue;
            }
            const vd w = half_weight(o.w_mode, o.w_scalar, s.w, k, h);
            const vd p = half_weight(o.p_mode, o.p_scalar, s.p, k, h);
            const vd positive = p * yv, one_minus_y = 1.0 - yv;
            if constexpr (SUM) {
                const vd tail = log1p_unit(s, k, h, e, ln2);
                const vd c = pick_neg(xv, positive, one_minus_y);
                const vd loss = (c * abs4(xv) + (positive + one_minus_y) * tail) * w;
                (h ? acc1 : acc0) += masked(loss, 0.0);
            }
            if constexpr (GRAD) {
                vd g = (one_minus_y * pick_neg(xv, small, large) - positive * pick_neg(xv, large, small)) * w;
                vd scale = splat(scale0);
                if (has_grad_output) {
                    const vf8 g8 = Lanes<T>::load(go + 8 * k);
                    scale = (h ? hi4(g8) : lo4(g8)) * scale0;
                }
                out[h] = masked(g, 0.0) * scale;
            }
        }
        if constexpr (GRAD) store_halves<T, STREAM>(gi + 8 * k, out[0], out[1]);
    };
    int k = 0;
    for (; k < SKEW && k < groups; ++k) stage1(k);
    for (; k < groups; ++k) { stage1(k); stage2(k - SKEW); stage3(k - SKEW); }
    for (int j = std::max(0, groups - SKEW); j < groups; ++j) { stage2(j); stage3(j); }
    if constexpr (TRACK_LARGE) has_large = any_set(beyond);
    if constexpr (POSITIVE) {
        s.soft = any_set(soft);
        if (s.soft) return false;
    }
    if (any_set(bad)) return false;
    const vd acc = acc0 + acc1;
    double total = 0.0;
    for (int j = 0; j < W; ++j) total += acc[j];
    sum = total;
    product = prod0 * prod1;
    kept_count = ignore ? kept : int64_t(groups) * 8;
    return true;
}

// One block of the probability loss. Returns false when an input is outside [0, 1], NaN or subnormal, or
// a kept target is outside [0, 1] or NaN: the exact path redoes the block and reports range errors.
// INTERIOR (mode 0 with the sum only) also returns false where x is 0 or 1: its logarithms need no clamp
// at -100 (see log_pair_f), its range checks are one unsigned maximum per group and operand, and a block
// that fails is redone without INTERIOR, which sets `has_edge` when some x is 0 or 1 (the next block then
// starts without INTERIOR). Both give the same bits where both apply.
template <class T, int MODE, bool SUM, bool GRAD, bool STREAM, bool INTERIOR = false>
__attribute__((noinline)) bool probabilities_block(const Args& a, const FastOptions& o, int64_t b, int groups, Scratch& s,
                         double& sum, int64_t& kept_count, bool& has_edge) {
    constexpr bool PLAIN = MODE == 0;
    static_assert(!INTERIOR || (PLAIN && SUM), "INTERIOR: the plain sum only");
    const T* x = static_cast<const T*>(a.x) + b;
    const T* y = static_cast<const T*>(a.y) + b;
    const T* go = static_cast<const T*>(a.grad_output) + (a.grad_output ? b : 0);
    T* gi = GRAD ? static_cast<T*>(a.grad_input) + b : nullptr;
    const double scale0 = o.scale;
    vu8 bad{}, edge{}, x_top{}, y_top{};
    vd acc0{}, acc1{}, acc2{}, acc3{};
    int64_t kept = 0;

    auto stage1 = [&](int k) __attribute__((always_inline)) {
        prefetch(x + 8 * k, y + 8 * k);
        const vf8 x8 = Lanes<T>::load(x + 8 * k), y8 = Lanes<T>::load(y + 8 * k);
        const vu8 yb = (vu8)y8;
        if constexpr (INTERIOR) {
            // the largest bits of x - 2^-126 and of y, as unsigned: checked once, after the block
            const vu8 x_shifted = (vu8)x8 - 0x00800000u;
            x_top = x_shifted > x_top ? x_shifted : x_top;
            y_top = yb > y_top ? yb : y_top;
        } else {
            bad |= bad_probabilities(x8);
            vu8 bad_y = (vu8)(yb > 0x3f800000u);  // outside [+0, 1] or NaN (-0.0 too: the exact path takes it)
            if (!PLAIN && o.ignore) bad_y &= (vu8)((vi8)kept_lanes(o, y8, true) < 0);  // ignored targets: any value
            bad |= bad_y;
        }
        if constexpr (SUM) log_pair_f<INTERIOR>(x8, s.L1[k], s.L2[k], edge);
    };
    auto stage3 = [&](int k) __attribute__((always_inline)) {
        const vf8 x8 = Lanes<T>::load(x + 8 * k), y8 = Lanes<T>::load(y + 8 * k);
        const vf8 kept8 = PLAIN ? splat8(-1.0f) : kept_lanes(o, y8, o.ignore);
        if (!PLAIN && o.ignore) kept += count_set(kept8);
        if constexpr (PLAIN && GRAD)
            Lanes<T>::template store8<STREAM>(gi + 8 * k, plain_probability_gradient(x8, y8, float(scale0)));
        vd out[2];  // the gradient's halves (with options or weights)
        for (int h = 0; h < 2; ++h) {
            const vd xv = h ? hi4(x8) : lo4(x8);
            vd keep = splat(-1.0);
            const vd yv = PLAIN ? (h ? hi4(y8) : lo4(y8)) : half_target(o, y8, kept8, h, keep, o.ignore);
            const vd w = PLAIN ? splat(1.0) : half_weight(o.w_mode, o.w_scalar, s.w, k, h);
            if constexpr (SUM) {
                const vd log_x = h ? hi4(s.L1[k]) : lo4(s.L1[k]), log_1mx = h ? hi4(s.L2[k]) : lo4(s.L2[k]);
                if (PLAIN) {  // the two terms in their own sums (negated at the end): an FMA each
                    (h ? acc1 : acc0) = yv * log_x + (h ? acc1 : acc0);
                    (h ? acc3 : acc2) = (1.0 - yv) * log_1mx + (h ? acc3 : acc2);
                } else {
                    const vd loss = -(yv * log_x + (1.0 - yv) * log_1mx);
                    (h ? acc1 : acc0) += pick_neg(keep, loss * w, splat(0.0));
                }
            }
            if constexpr (GRAD && !PLAIN) {  // with options or weights: double lanes, rounded once
                const vd denom = max4(xv * (1.0 - xv), splat(GRAD_EPSILON));
                vd g = (xv - yv) / denom;
                vd scale = splat(scale0);
                if (o.grad_output) {
                    const vf8 g8 = Lanes<T>::load(go + 8 * k);
                    scale = (h ? hi4(g8) : lo4(g8)) * scale0;
                }
                out[h] = pick_neg(keep, g * w, splat(0.0)) * scale;
            }
        }
        if constexpr (GRAD && !PLAIN) store_halves<T, STREAM>(gi + 8 * k, out[0], out[1]);
    };
    // two stages: the logarithms (stage 1) run SKEW groups ahead of the combination (stage 3)
    int k = 0;
    for (; k < SKEW && k < groups; ++k) stage1(k);
    for (; k < groups; ++k) { stage1(k); stage3(k - SKEW); }
    for (int j = std::max(0, groups - SKEW); j < groups; ++j) stage3(j);
    if constexpr (PLAIN && SUM && !INTERIOR) has_edge = any_set(edge);
    // INTERIOR: every x a normal float below 1 (x - 2^-126 at most 1 - 2^-24 - 2^-126: smaller x wrap
    // around), every y in [+0, 1]
    if constexpr (INTERIOR) bad = (vu8)(x_top > 0x3f7fffffu - 0x00800000u) | (vu8)(y_top > 0x3f800000u);
    if (any_set(bad)) return false;
    const vd acc = PLAIN ? -((acc0 + acc1) + (acc2 + acc3)) : acc0 + acc1;
    double total = 0.0;
    for (int j = 0; j < W; ++j) total += acc[j];
    sum = total;
    kept_count = (PLAIN || !o.ignore) ? int64_t(groups) * 8 : kept;
    return true;
}

// Whether every target of a block is 0 or 1 (+0.0f or 1.0f exactly): the first group that is not
// answers no, so soft targets pay for one group's test per block.
template <class T>
BCEKIT_INLINE bool hard_targets(const T* y, int groups) {
    for (int k = 0; k < groups; ++k) {
        const vu8 yb = (vu8)Lanes<T>::load(y + 8 * k);
        const vu8 hard = (vu8)(yb == 0u) | (vu8)(yb == 0x3f800000u);
        if (count_set((vf8)hard) != 8) return false;
    }
    return true;
}

// The end of a block whose sum is a product (probabilities_hard_block, probabilities_weighted_hard_block):
// false where a lane of `bad` is set, else the linear terms' sum and the product's mantissa and exponent
// (`e` summed the groups' biased exponents).
BCEKIT_INLINE bool product_block_result(vu8 bad, vd linear, vd m, vl e, int groups, double& sum, vd& mantissa,
                                        vl& exponent) {
    if (any_set(bad)) return false;
    double total = 0.0;
    for (int j = 0; j < W; ++j) total += linear[j];
    sum = total;
    mantissa = m;
    exponent = e - int64_t(groups) * 1023;
    return true;
}

// One block of the probability loss without options or weights, every target 0 or 1 (hard_targets):
// each element's loss is -log q with q = x where y = 1 and q = 1 - x where y = 0, so the block's sum is
// -log of a product, as for the logits (LogProduct): a multiplication per element instead of two
// logarithms. In double, x + (y - 1) is q or -q exactly (signs dropped at the end); a product of two
// factors of at least 2^-126 each (x is zero or normal, 1 - x >= 2^-24) cannot underflow a mantissa in
// [1, 2), which is restored after every group (its exponent moved to an integer). Every rounding of the
// product is an absolute error of 2^-53 in the sum, so where y = 0 and x < 2^-27 the factor is 1 and x is
// added instead (-log(1 - x) = x to 2^-28 relative), as the logits add e below 2^-27. Returns false,
// for the soft block or the exact path to redo, when an input is outside [0, 1], NaN or subnormal, or q
// = 0 (x = 0 with y = 1, x = 1 with y = 0: the soft block applies the clamp at -100).
template <class T, bool GRAD, bool STREAM>
__attribute__((noinline)) bool probabilities_hard_block(const Args& a, int64_t b, int groups, double& sum,
                                                         vd& mantissa, vl& exponent) {
    const T* x = static_cast<const T*>(a.x) + b;
    const T* y = static_cast<const T*>(a.y) + b;
    T* gi = GRAD ? static_cast<T*>(a.grad_input) + b : nullptr;
    const float scale = float(a.grad_scale);
    vu8 bad{};
    vd m = splat(1.0), linear{};
    vl e{};
    for (int k = 0; k < groups; ++k) {
        prefetch(x + 8 * k, y + 8 * k);
        const vf8 x8 = Lanes<T>::load(x + 8 * k), y8 = Lanes<T>::load(y + 8 * k);
        bad |= bad_probabilities(x8) | (vu8)(x8 == 1.0f - y8);  // or q = 0
        if constexpr (GRAD) Lanes<T>::template store8<STREAM>(gi + 8 * k, plain_probability_gradient(x8, y8, scale));
        const vi8 tiny = (x8 + y8) < 0x1p-27f;  // y = 0 and x < 2^-27
        const vf8 x_tiny = (vf8)((vi8)x8 & tiny), x_factor = (vf8)((vi8)x8 & ~tiny);
        linear += lo4(x_tiny) + hi4(x_tiny);
        const vf8 shift = y8 - 1.0f;  // 0 or -1, exact
        const vd q = (lo4(x_factor) + lo4(shift)) * (hi4(x_factor) + hi4(shift));  // |q| >= 2^-252
        const vq bits = (vq)(m * q);
        e += (vl)((bits << 1) >> 53);  // biased exponent (the sign bit shifted out)
        m = (vd)((bits & 0x800fffffffffffffULL) | 0x3ff0000000000000ULL);  // sign kept: absorb drops it
    }
    return product_block_result(bad, linear, m, e, groups, sum, mantissa, exponent);
}

// One block of the probability loss with a weight and no options, every target 0 or 1: the loss is -w
// log q (q = x or 1 - x, as probabilities_hard_block), summed as -log of products, one per run of one
// weight (CLASSES false: a SCALAR weight, or a PER_ROW one whose rows cover whole blocks, `run_weight`;
// the block's product comes back as mantissa and exponent) or one per class (CLASSES: the block starting
// at class `column` of `classes`; each element's q goes to Scratch::B, for the caller's ClassProducts).
// Elements with y = 0 and x < 2^-27 add w x instead. The gradient is the per-element block's, in double
// lanes (the same bits). Returns false where probabilities_hard_block does, and for a target other than
// 0 or 1: the caller then takes the per-element block.
template <class T, bool CLASSES, bool SUM, bool GRAD, bool STREAM>
__attribute__((noinline)) bool probabilities_weighted_hard_block(const Args& a, int64_t b, int groups, Scratch& s,
                                                                  int64_t column, int64_t classes, double run_weight,
                                                                  double& sum, vd& mantissa, vl& exponent) {
    const T* x = static_cast<const T*>(a.x) + b;
    const T* y = static_cast<const T*>(a.y) + b;
    const T* w = static_cast<const T*>(a.w);
    T* gi = GRAD ? static_cast<T*>(a.grad_input) + b : nullptr;
    const double scale = a.grad_scale;
    vu8 bad{};
    vd m = splat(1.0), linear{};
    vl e{};
    for (int k = 0; k < groups; ++k) {
        prefetch(x + 8 * k, y + 8 * k);
        const vf8 x8 = Lanes<T>::load(x + 8 * k), y8 = Lanes<T>::load(y + 8 * k);
        bad |= bad_probabilities(x8) | (vu8)(x8 == 1.0f - y8) | ~((vu8)(y8 == 0.0f) | (vu8)(y8 == 1.0f));
        vf8 w8 = splat8(float(run_weight));
        if constexpr (CLASSES) {
            w8 = Lanes<T>::load(w + column);
            column += 8;
            if (column == classes) column = 0;
        }
        if constexpr (GRAD) {
            vd out[2];
            for (int h = 0; h < 2; ++h) {  // the per-element block's formula
                const vd xv = h ? hi4(x8) : lo4(x8), yv = h ? hi4(y8) : lo4(y8), wv = h ? hi4(w8) : lo4(w8);
                const vd denom = max4(xv * (1.0 - xv), splat(GRAD_EPSILON));
                out[h] = ((xv - yv) / denom * wv) * scale;
            }
            store_halves<T, STREAM>(gi + 8 * k, out[0], out[1]);
        }
        if constexpr (SUM) {
            const vi8 tiny = (x8 + y8) < 0x1p-27f;  // y = 0 and x < 2^-27
            const vf8 x_tiny = (vf8)((vi8)x8 & tiny), x_factor = (vf8)((vi8)x8 & ~tiny);
            // (a run's weight is applied by the caller, to this sum and the product's logarithm)
            linear += CLASSES ? lo4(x_tiny) * lo4(w8) + hi4(x_tiny) * hi4(w8) : lo4(x_tiny) + hi4(x_tiny);
            const vf8 shift = y8 - 1.0f;  // 0 or -1, exact
            const vd q0 = abs4(lo4(x_factor) + lo4(shift)), q1 = abs4(hi4(x_factor) + hi4(shift));  // >= 2^-126
            if constexpr (CLASSES) {
                std::memcpy(s.B + 8 * k, &q0, sizeof q0);
                std::memcpy(s.B + 8 * k + 4, &q1, sizeof q1);
            } else {
                const vq bits = (vq)(m * (q0 * q1));
                e += (vl)(bits >> 52);
                m = (vd)((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
            }
        }
    }
    return product_block_result(bad, linear, m, e, groups, sum, mantissa, exponent);
}

// A chunk's terms from its class products P 2^E: the sum over classes of (v - offset) (-log(P 2^E)), v the
// class's value in `values`: the weight w (offset 0: logits mode 5, whose E stay 0, and probabilities mode
// 5), or the pos_weight p (offset 1: logits mode 6, the terms (p - 1) log1p(e) of the positives).
template <class T>
long double class_sum(const void* values, double offset, const ClassProducts& cp) {
    const T* v = static_cast<const T*>(values);
    vd acc{};
    for (int64_t c = 0; c < cp.classes; c += 8) {
        const vf8 v8 = Lanes<T>::load(v + c);
        for (int h = 0; h < 2; ++h) {
            vd P;
            vl E;
            std::memcpy(&P, cp.P + c + 4 * h, sizeof P);
            std::memcpy(&E, cp.E + c + 4 * h, sizeof E);
            acc -= ((h ? hi4(v8) : lo4(v8)) - offset) * (log_product(P) + __builtin_convertvector(E, vd) * LN2);
        }
    }
    long double total = 0.0L;
    for (int l = 0; l < W; ++l) total += acc[l];
    return total;
}

template <class T, bool LOGITS, int MODE, bool SUM, bool GRAD, bool STREAM>
ChunkResult fast_chunk_impl(const Args& a, const FastOptions& o, int64_t begin, int64_t end) {
    Scratch scratch;
    ChunkResult result;
    constexpr bool CLASS = LOGITS && (MODE == 5 || MODE == 6);
    constexpr bool BOUNDABLE = LOGITS && MODE != 2;  // the logits modes with a BOUNDED form
    constexpr bool PRODUCT = LOGITS ? MODE != 2 && MODE != 5 : MODE == 0;
    // probabilities with a weight, 0/1 targets: products per run of one weight (mode 4) or per class (5)
    constexpr bool WEIGHTED_HARD = !LOGITS && (MODE == 4 || MODE == 5);
    // logits modes 5 and 6, probabilities mode 5: the class products (reset below: C, not MAX_CLASSES)
    constexpr bool CLASS_PRODUCTS = CLASS || (!LOGITS && MODE == 5);
    std::conditional_t<CLASS_PRODUCTS, ClassProducts, char> classes;
    const int64_t class_count = MODE == 6 ? a.p_inner : a.w_inner;
    // logits mode 6, probabilities modes 4 and 5: after a block they cannot take (soft targets; for the
    // probabilities also a clamped term or a range error) the chunk's blocks take the per-element form
    bool rest_per_element = false;
    // logits mode 6: the product blocks' sums, weighed by the scalar weight with the products' logarithms
    long double positive_sum = 0.0L;
    if constexpr (CLASS_PRODUCTS) classes.reset(class_count);
    LogProduct product;  // logits, MODE != 2: the product of 1 / (1 + e) (see logits_block), of the
                         // current run of one weight in mode 4
                         // probabilities, MODE 0: the product of q over blocks of hard targets
    bool hard_blocks = false;  // whether there are any (soft targets skip the product's logarithms)
    bool bounded = true;       // logits, product modes with the sum: whether the last block had every |x| <= 18
    bool interior = true;      // probabilities, mode 0 with the sum: whether the last soft block had no x = 0, 1
    auto add_exact = [&](int64_t from, int64_t to) {
        const ChunkResult exact = exact_chunk<T>(a, from, to);
        result.sum += exact.sum;
        result.kept += exact.kept;
        result.bad_input |= exact.bad_input;
        result.bad_target |= exact.bad_target;
    };
    const int64_t whole = begin + (end - begin) / 8 * 8;  // whole groups; the rest takes the exact path
    // mode 4: runs of one weight (the chunk for a SCALAR weight, else a row: blocks stop at its end), each
    // summed as w (sum of c |x| - log of the product), added when the run ends
    const T* run_weights = static_cast<const T*>(a.w);
    const int64_t run_length = MODE == 4 && o.w_mode == PER_ROW ? a.w_inner : 0;
    int64_t run_end = begin;
    double run_weight = 1.0;
    long double run_sum = 0.0L;
    auto end_run = [&]() {
        if (SUM && MODE == 4) result.sum += (long double)run_weight * (run_sum - product.log_combined());
        product = LogProduct();
        run_sum = 0.0L;
    };
    for (int64_t b = begin; b < whole;) {
        if constexpr (MODE == 4) {
            if (b == run_end) {  // a new run
                if (b > begin) end_run();
                // a row ends at a multiple of its length; a SCALAR weight's run is the chunk
                run_end = o.w_mode == SCALAR ? whole : std::min(whole, (b / run_length + 1) * run_length);
                run_weight = o.w_mode == SCALAR ? double(o.w_scalar)
                                                : double(float(Storage<T>::get(run_weights + b / run_length)));
            }
        }
        const int len = int(std::min<int64_t>(MODE == 4 ? run_end - b : FAST_BLOCK, std::min<int64_t>(FAST_BLOCK, whole - b)));
        bool per_element = MODE == 2 || rest_per_element;
        auto fill = [&]() {
            if (o.w_mode != ABSENT && o.w_mode != SCALAR)
                fill_weights<T>(a.w, o.w_mode, a.w_inner, b, len, scratch.w);
            if (LOGITS && o.p_mode != ABSENT && o.p_mode != SCALAR)
                fill_weights<T>(a.p, o.p_mode, a.p_inner, b, len, scratch.p);
        };
        if (per_element) fill();
        double sum = 0.0;
        int64_t kept = 0;
        bool ok;
        if constexpr (LOGITS) {
            vd block_product;
            bool large = false;
            const int64_t column = CLASS ? b % class_count : 0;
            ok = false;
            if constexpr (MODE == 6) {
                if (per_element)
                    ok = logits_block<T, 2, SUM, GRAD, STREAM>(a, o, b, len / 8, scratch, sum, block_product, kept, large);
            }
            if constexpr (BOUNDABLE && SUM) {
                if (!per_element && bounded)
                    ok = logits_block<T, MODE, true, GRAD, STREAM, true>(a, o, b, len / 8, scratch, sum, block_product,
                                                                         kept, large, run_weight, column, class_count);
            }
            if (!ok && !per_element && !scratch.soft) {
                ok = logits_block<T, MODE, SUM, GRAD, STREAM>(a, o, b, len / 8, scratch, sum, block_product, kept, large,
                                                              run_weight, column, class_count);
                bounded = !large;
            }
            if constexpr (MODE == 6) {
                if (scratch.soft) {  // this block and the rest of the chunk per element
                    scratch.soft = false;
                    rest_per_element = per_element = true;
                    fill();
                    ok = logits_block<T, 2, SUM, GRAD, STREAM>(a, o, b, len / 8, scratch, sum, block_product, kept, large);
                }
            }
            if (ok && SUM && PRODUCT && !per_element) product.fold(block_product);
            if constexpr (CLASS && SUM) {
                if (ok && !per_element) classes.merge(scratch.B, column, len);
            }
        } else if constexpr (WEIGHTED_HARD) {
            bool edge = false;
            ok = false;
            if (!per_element) {
                const int64_t column = MODE == 5 ? b % class_count : 0;
                vd mantissa;
                vl exponent;
                ok = probabilities_weighted_hard_block<T, MODE == 5, SUM, GRAD, STREAM>(
                    a, b, len / 8, scratch, column, class_count, run_weight, sum, mantissa, exponent);
                if (ok && SUM) {
                    if constexpr (MODE == 5) classes.merge_factors(scratch.B, column, len);
                    else product.absorb(mantissa, exponent);
                }
                kept = len;
                if (!ok) {
                    rest_per_element = per_element = true;
                    fill();
                }
            }
            if (per_element) ok = probabilities_block<T, 2, SUM, GRAD, STREAM>(a, o, b, len / 8, scratch, sum, kept, edge);
        } else {
            ok = false;
            bool edge = false;
            if constexpr (MODE == 0 && SUM) {
                vd mantissa;
                vl exponent;
                if (hard_targets(static_cast<const T*>(a.y) + b, len / 8) &&
                    probabilities_hard_block<T, GRAD, STREAM>(a, b, len / 8, sum, mantissa, exponent)) {
                    product.absorb(mantissa, exponent);
                    kept = len;
                    ok = hard_blocks = true;
                } else if (interior) {
                    ok = probabilities_block<T, 0, true, GRAD, STREAM, true>(a, o, b, len / 8, scratch, sum, kept, edge);
                }
            }
            if (!ok) {
                ok = probabilities_block<T, MODE, SUM, GRAD, STREAM>(a, o, b, len / 8, scratch, sum, kept, edge);
                interior = !edge;
            }
        }
        if (ok) {
            (MODE == 4 && !per_element ? run_sum : LOGITS && MODE == 6 && !per_element ? positive_sum : result.sum) += sum;
            result.kept += kept;
        } else {
            add_exact(b, b + len);
        }
        b += len;
    }
    if constexpr (MODE == 4) end_run();
    else if constexpr (MODE == 5) { if (SUM) result.sum += class_sum<T>(a.w, 0.0, classes); }
    else if constexpr (MODE == 6) {
        if (SUM) result.sum += (long double)o.w_scalar * (positive_sum - product.log() + class_sum<T>(a.p, 1.0, classes));
    }
    else if (SUM && (LOGITS ? PRODUCT : hard_blocks)) result.sum -= product.log();
    if (whole < end) add_exact(whole, end);
#if defined(__AVX2__)
    if constexpr (STREAM) _mm_sfence();  // streaming stores are weakly ordered: publish them first
#endif
    return result;
}

// Rows of PER_ROW weights at least this long take mode 4 (each run's product costs four logarithms).
constexpr int64_t MIN_RUN = 64;

template <class T, bool LOGITS, int MODE>
ChunkResult fast_chunk_outputs(const Args& a, const FastOptions& o, int64_t begin, int64_t end) {
    if constexpr (std::is_same<T, float>::value) {  // streaming stores: float gradients only
        if (o.stream && o.sum) return fast_chunk_impl<T, LOGITS, MODE, true, true, true>(a, o, begin, end);
        if (o.stream) return fast_chunk_impl<T, LOGITS, MODE, false, true, true>(a, o, begin, end);
    }
    if (o.sum && o.grad) return fast_chunk_impl<T, LOGITS, MODE, true, true, false>(a, o, begin, end);
    if (o.sum) return fast_chunk_impl<T, LOGITS, MODE, true, false, false>(a, o, begin, end);
    return fast_chunk_impl<T, LOGITS, MODE, false, true, false>(a, o, begin, end);
}

// Modes 5 and 6: MIN_CLASSES to MAX_CLASSES classes, a multiple of 8, and a chunk of `length` elements
// gives no class more than MAX_FACTORS of them.
inline bool class_form(int64_t c, int64_t length) {
    return c % 8 == 0 && c >= MIN_CLASSES && c <= MAX_CLASSES && length / c + 1 <= MAX_FACTORS;
}

// Whether values [from, to) are finite. The product modes (4, 5, 6; both losses) need finite weights: a
// weight multiplies a run's or a class's sum of terms there, and an infinite one times a zero term must
// give NaN per element, as the per-element form (and torch) gives it.
template <class T>
bool finite_values(const void* data, int64_t from, int64_t to) {
    const T* v = static_cast<const T*>(data);
    vu8 bad{};
    int64_t i = from;
    for (; i + 8 <= to; i += 8) bad |= (vu8)((vu8)abs8(Lanes<T>::load(v + i)) > 0x7f7fffffu);
    bool finite = !any_set(bad);
    for (; i < to; ++i) finite &= std::isfinite(float(Storage<T>::get(v + i)));
    return finite;
}

// The weight values a chunk [begin, end) reads (SCALAR, PER_CLASS, PER_ROW forms) are finite.
template <class T>
bool finite_weights(const Args& a, int64_t begin, int64_t end) {
    if (a.w_mode == SCALAR) return finite_values<T>(a.w, 0, 1);
    if (a.w_mode == PER_CLASS) return finite_values<T>(a.w, 0, a.w_inner);
    return finite_values<T>(a.w, begin / a.w_inner, (end - 1) / a.w_inner + 1);  // PER_ROW
}

// Mode 6 also needs every pos_weight finite and at least 1/2: the class's term p L is formed as L + (p - 1)
// L, L in the chunk's product and in the class's, which may cancel by a factor of 2 at most.
template <class T>
bool pos_weights_from_half(const Args& a) {
    const T* p = static_cast<const T*>(a.p);
    vi8 out{};
    for (int64_t c = 0; c < a.p_inner; c += 8) {
        const vf8 p8 = Lanes<T>::load(p + c);
        out |= ~((vi8)(p8 >= 0.5f) & (vi8)(p8 <= 3.4028234663852886e38f));
    }
    return count_set((vf8)out) == 0;
}

// The kernel's entry for float and half storage: the fast path where it applies, else the exact path.
template <class T>
ChunkResult fast_chunk(const Args& a, int64_t begin, int64_t end) {
    if (a.loss || a.grad_target || !(a.want_sum || a.grad_input)) return exact_chunk<T>(a, begin, end);
    const FastOptions o(a, static_cast<const T*>(nullptr));
    const int mode = o.plain() ? 0 : (o.w_mode == ABSENT && o.p_mode == ABSENT ? 1 : 2);
    if (a.kind == LOGITS) {
        if (mode == 0) return fast_chunk_outputs<T, true, 0>(a, o, begin, end);
        if (mode == 1 && o.ignore) return fast_chunk_outputs<T, true, 3>(a, o, begin, end);
        if (mode == 1) return fast_chunk_outputs<T, true, 1>(a, o, begin, end);
        // one weight over runs of at least MIN_RUN elements, no pos_weight: mode 4
        if (o.p_mode == ABSENT && (o.w_mode == SCALAR || (o.w_mode == PER_ROW && a.w_inner % 8 == 0 &&
                                                          a.w_inner >= MIN_RUN)) && finite_weights<T>(a, begin, end))
            return fast_chunk_outputs<T, true, 4>(a, o, begin, end);
        if (o.w_mode == PER_CLASS && o.p_mode == ABSENT && class_form(a.w_inner, end - begin) &&
            finite_weights<T>(a, begin, end))
            return fast_chunk_outputs<T, true, 5>(a, o, begin, end);
        if (o.p_mode == PER_CLASS && (o.w_mode == ABSENT || (o.w_mode == SCALAR && finite_weights<T>(a, begin, end))) &&
            !o.smooth && class_form(a.p_inner, end - begin) && pos_weights_from_half<T>(a))
            return fast_chunk_outputs<T, true, 6>(a, o, begin, end);
        return fast_chunk_outputs<T, true, 2>(a, o, begin, end);
    }
    // the probability loss: its modes 1 and 2 are one (weights read per element); a weight without options
    // takes modes 4 (one weight per run, as the logits') and 5 (per class) where the targets are 0 or 1
    if (mode == 0) return fast_chunk_outputs<T, false, 0>(a, o, begin, end);
    if (!o.smooth && !o.ignore && !o.grad_output) {
        const bool runs = o.w_mode == SCALAR || (o.w_mode == PER_ROW && a.w_inner % 8 == 0 && a.w_inner >= MIN_RUN);
        const bool classes = o.w_mode == PER_CLASS && class_form(a.w_inner, end - begin);
        if ((runs || classes) && finite_weights<T>(a, begin, end))
            return runs ? fast_chunk_outputs<T, false, 4>(a, o, begin, end) : fast_chunk_outputs<T, false, 5>(a, o, begin, end);
    }
    return fast_chunk_outputs<T, false, 2>(a, o, begin, end);
}
