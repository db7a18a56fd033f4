// The float64 loss in double-double lanes: W elements at a time, each quantity carried as an unevaluated
// sum hi + lo of two doubles (about 106 significant bits), rounded to float64 once at the end.
//
// Included once per instruction set by dd_<isa>.cpp, inside namespace BCEKIT_ISA; those files are built
// with -ffp-contract=off, since the error-free transformations below (two_sum, two_prod) are only exact
// when the compiler evaluates them as written.
//
// The functions, for the elements a lane takes (see `slow` below for the others):
//   exp(-a), 0 <= a <= 600: a = k ln2 / 32 + r (ln2 in two parts), |r| <= 0.0109, exp(-r) by its Taylor
//            series to r^8, the terms from r^2 on in double (below 6e-5 of the sum: 2^-66), times
//            2^(-j/32) from a double-double table (k = 32 m + j) and 2^-m in the exponent bits.
//   log(m),  m = (1 + z) / (1 - z): 2 atanh(z) = 2z (1 + z^2 R(z^2)), R the series 1/3 + w/5 + ... + w^11/25;
//            |z| <= 0.1716 by the reductions below, so w R(w) < 0.0099, computed in double (2^-59.7).
//   log1p(t), t in (0, 1]: z = t / (2 + t), or for t > sqrt(2) - 1, ln 2 + 2 atanh((t - 1) / (t + 3)).
//   log(u),  u > 0 in double-double: u = 2^e m, m in [sqrt(1/2), sqrt(2)), e ln 2 + 2 atanh((m - 1) / (m + 1)).
// With smoothing s, the target y' = y (1 - s) + s/2 and its complement (1 - y)(1 - s) + s/2 are both sums of
// non-negative terms, as are the losses below, so no step cancels and the double-double result is within
// 2^-58 of exact relative to itself: after the final rounding, within 0.52 ulp.
//   logits:        p y' (max(-x, 0) + log1p(e^-|x|)) + (1 - y') (max(x, 0) + log1p(e^-|x|)), times w
//   probabilities: y' min(-log x, 100) + (1 - y') min(-log(1 - x), 100), times w
// tests/test_accuracy.py checks the results against mpmath, element by element.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_api.h"


#include "dd_tables.h"

#if defined(__FMA__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace bcekit {
namespace BCEKIT_ISA {
namespace dd {

// W lanes: one register of the ISA (AVX-512: 8 doubles; AVX2: 4; the baseline build's 4 are two SSE2 or
// NEON registers). Where the ISA has FMA, the fused operations below go through its intrinsics, one
// register (REG lanes) at a time.
#if defined(__AVX512F__)
constexpr int W = 8, REG = 8;
typedef __m512d Reg;
typedef __m512i RegI;
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_pd(a, b, c); }
inline Reg fmsub(Reg a, Reg b, Reg c) { return _mm512_fmsub_pd(a, b, c); }
inline Reg gather_reg(const double* table, RegI index) { return _mm512_i64gather_pd(index, table, 8); }
#define BCEKIT_DD_FMA 1
#elif defined(__FMA__) && defined(__AVX2__)
constexpr int W = 4, REG = 4;
typedef __m256d Reg;
typedef __m256i RegI;
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_pd(a, b, c); }
inline Reg fmsub(Reg a, Reg b, Reg c) { return _mm256_fmsub_pd(a, b, c); }
inline Reg gather_reg(const double* table, RegI index) { return _mm256_i64gather_pd(table, index, 8); }
#define BCEKIT_DD_FMA 1
#else
constexpr int W = 4;
#endif
typedef double V __attribute__((vector_size(8 * W)));
typedef int64_t M __attribute__((vector_size(8 * W)));

#if defined(BCEKIT_DD_FMA)
inline Reg load_register(const V& v, int j) {
    Reg r;
    std::memcpy(&r, reinterpret_cast<const double*>(&v) + j, sizeof r);
    return r;
}
// f applied to each register's worth of lanes of the arguments
template <class F, class... A>
inline V per_register(F f, const A&... args) {
    V r;
    for (int j = 0; j < W; j += REG) {
        Reg out = f(load_register(args, j)...);
        std::memcpy(reinterpret_cast<double*>(&r) + j, &out, sizeof out);
    }
    return r;
}
#endif

inline V splat(double v) { return V{} + v; }
inline M splat_m(int64_t v) { return M{} + v; }
inline V sel(M mask, V a, V b) { return mask ? a : b; }
inline M sel(M mask, M a, M b) { return mask ? a : b; }

struct D {  // hi + lo, |lo| <= ulp(hi) / 2
    V h, l;
};
inline D sel(M mask, D a, D b) { return {mask ? a.h : b.h, mask ? a.l : b.l}; }
inline D neg(D a) { return {-a.h, -a.l}; }
inline D from(V a) { return {a, V{}}; }

// a * b = p + e exactly
inline D two_prod(V a, V b) {
    const V p = a * b;
#if defined(BCEKIT_DD_FMA)
    return {p, per_register([](Reg x, Reg y, Reg z) { return fmsub(x, y, z); }, a, b, p)};
#else  // Dekker: split each factor into 26-bit halves whose products are exact (|a|, |b| < 2^996)
    const V c = splat(134217729.0);  // 2^27 + 1
    const V ta = c * a, ah = ta - (ta - a), al = a - ah;
    const V tb = c * b, bh = tb - (tb - b), bl = b - bh;
    return {p, ((ah * bh - p) + ah * bl + al * bh) + al * bl};
#endif
}
// a * b + c, fused where the CPU has FMA: for polynomials and the low parts of products, where rounding
// once or twice is immaterial
inline V madd(V a, V b, V c) {
#if defined(BCEKIT_DD_FMA)
    return per_register([](Reg x, Reg y, Reg z) { return fmadd(x, y, z); }, a, b, c);
#else
    return a * b + c;
#endif
}
inline V madd(V a, V b, double c) { return madd(a, b, splat(c)); }

// table[index[j]] per lane
inline V gather(const double* table, M index) {
    V r;
#if defined(BCEKIT_DD_FMA)
    for (int j = 0; j < W; j += REG) {
        RegI i;
        std::memcpy(&i, reinterpret_cast<const int64_t*>(&index) + j, sizeof i);
        const Reg g = gather_reg(table, i);
        std::memcpy(reinterpret_cast<double*>(&r) + j, &g, sizeof g);
    }
#else
    for (int j = 0; j < W; ++j) r[j] = table[index[j]];
#endif
    return r;
}

inline bool all(M mask) {
    bool every = true;
    for (int j = 0; j < W; ++j) every &= mask[j] != 0;
    return every;
}

// a + b = s + e exactly
inline D two_sum(V a, V b) {
    const V s = a + b, bb = s - a;
    return {s, (a - (s - bb)) + (b - bb)};
}
inline D fast_two_sum(V a, V b) {  // |a| >= |b| (or a == 0)
    const V s = a + b;
    return {s, b - (s - a)};
}
inline D add(D a, D b) {
    const D s = two_sum(a.h, b.h);
    return fast_two_sum(s.h, s.l + (a.l + b.l));
}
inline D add(D a, V b) {
    const D s = two_sum(a.h, b);
    return fast_two_sum(s.h, s.l + a.l);
}
inline D mul(D a, D b) {
    const D p = two_prod(a.h, b.h);
    return fast_two_sum(p.h, madd(a.h, b.l, madd(a.l, b.h, p.l)));
}
inline D mul(D a, V b) {
    const D p = two_prod(a.h, b);
    return fast_two_sum(p.h, madd(a.l, b, p.l));
}
inline D div(D a, D b) {
    const V q1 = a.h / b.h;
    const D r = add(a, neg(mul(b, q1)));
    return fast_two_sum(q1, r.h / b.h);
}
constexpr double ROUND = 0x1.8p52;  // (v + ROUND) - ROUND is v rounded to an integer, |v| < 2^51

inline D scale(D a, V power_of_two) { return {a.h * power_of_two, a.l * power_of_two}; }

// Integer-valued doubles and int64 lanes, |v| < 2^51, through the bits of 1.5 * 2^52 + v (AVX2 has no
// vector conversion between double and int64).
inline M to_int(V v) { return M(v + ROUND) - M(splat(ROUND)); }
inline V to_double(M v) { return V(v + M(splat(ROUND))) - ROUND; }

// 2^k for integer-valued k in [-1022, 1023], in the exponent bits
inline V pow2(M k) { return V((k + 1023) << 52); }

constexpr double LN2_HI = 0x1.62e42fefa39efp-1, LN2_LO = 0x1.abc9e3b39803fp-56;
constexpr double INV_LN2 = 0x1.71547652b82fep+0;
constexpr double SIXTH_HI = 0x1.5555555555555p-3, SIXTH_LO = 0x1.5555555555555p-57;
constexpr double SQRT2 = 0x1.6a09e667f3bcdp+0, SQRT2_M1 = 0x1.a827999fcef32p-2;

inline D ln2_times(V k) {  // k ln 2 for integer-valued |k| < 2^11
    D p = two_prod(k, splat(LN2_HI));
    return fast_two_sum(p.h, p.l + k * LN2_LO);
}

// exp(-a) for a in [0, 600]
inline D exp_neg(V a) {
    constexpr int N = dd_tables::EXP_TABLE;
    static_assert(N == 1 << 5, "k = 32 m + j below");
    const V k = (a * (INV_LN2 * N) + ROUND) - ROUND;
    D p = two_prod(k, splat(LN2_HI / N));
    p = fast_two_sum(p.h, madd(k, splat(LN2_LO / N), p.l));  // k ln2 / N
    D r = two_sum(a, -p.h);
    r = two_sum(r.h, r.l - p.l);  // a - k ln2 / N, |r| <= ln2 / 2N (0.0109)
    // exp(-r) = 1 - r + r^2 (1/2 - r/6 + ... + r^6/8!): the r^2 terms in double (below 6e-5 of the sum)
    const V u = -r.h;
    V q = splat(1.0 / 40320.0);
    q = madd(q, u, 1.0 / 5040.0);
    q = madd(q, u, 1.0 / 720.0);
    q = madd(q, u, 1.0 / 120.0);
    q = madd(q, u, 1.0 / 24.0);
    q = madd(q, u, 1.0 / 6.0);
    q = madd(q, u, 0.5);
    q = q * (u * u);
    D e = two_sum(splat(1.0), u);
    e = fast_two_sum(e.h, e.l + (q - r.l));
    const M ki = to_int(k);
    const M j = ki & (N - 1);
    const D table = {gather(dd_tables::EXP2_NEG_HI, j), gather(dd_tables::EXP2_NEG_LO, j)};
    return scale(mul(e, table), pow2(-(ki >> 5)));
}

// 2 atanh(z) for |z| <= 0.1716
inline D atanh2(D z) {
    const V w = z.h * z.h;
    V r = splat(1.0 / 25);
    r = madd(r, w, 1.0 / 23);
    r = madd(r, w, 1.0 / 21);
    r = madd(r, w, 1.0 / 19);
    r = madd(r, w, 1.0 / 17);
    r = madd(r, w, 1.0 / 15);
    r = madd(r, w, 1.0 / 13);
    r = madd(r, w, 1.0 / 11);
    r = madd(r, w, 1.0 / 9);
    r = madd(r, w, 1.0 / 7);
    r = madd(r, w, 1.0 / 5);
    r = madd(r, w, 1.0 / 3);
    D s = two_sum(z.h, z.h * (w * r));  // z + z w R(w)
    s = fast_two_sum(s.h, s.l + z.l);
    return {2.0 * s.h, 2.0 * s.l};
}

// log(1 + t) for t in (0, 1]
inline D log1p_unit(D t) {
    const M big = t.h > SQRT2_M1;
    const D num = sel(big, add(t, splat(-1.0)), t);
    const D den = add(t, sel(big, splat(3.0), splat(2.0)));
    const D z = atanh2(div(num, den));
    return sel(big, add(z, D{splat(LN2_HI), splat(LN2_LO)}), z);
}

// log(u) for u >= 2^-1000 (normal, with a normal lo part or lo == 0)
inline D log_dd(D u) {
    const M bits = M(u.h);
    M e = ((bits >> 52) & 0x7ff) - 1023;
    D m = scale(u, pow2(-e));  // in [1, 2)
    const M big = m.h > SQRT2;
    m = sel(big, scale(m, splat(0.5)), m);
    e = sel(big, e + 1, e);
    // m - 1 is exact in hi (Sterbenz: m in [0.70, 1.42))
    const D num = two_sum(m.h - 1.0, m.l);
    const D den = add(m, splat(1.0));
    return add(ln2_times(to_double(e)), atanh2(div(num, den)));
}

// log(1 - x) for x in [0, 0.2929]: 2 atanh(-x / (2 - x))
inline D log1m_small(V x) { return atanh2(div(from(-x), two_sum(splat(2.0), -x))); }

inline V load(const double* p, int64_t i) {
    V v;
    std::memcpy(&v, p + i, sizeof v);
    return v;
}

constexpr double TINY_INPUT = 0x1p-300;   // nonzero inputs below this go to the slow path
constexpr double TINY_RESULT = 0x1p-900;  // nonzero results below this go to the slow path
constexpr double LARGE = 0x1p400;         // weights beyond this go to the slow path

inline M is_tiny(V v) { return (v != 0.0) & (v < TINY_INPUT) & (v > -TINY_INPUT); }

// The -log terms, per vector of a block, for x where the lane's x is valid (else of a harmless value):
// logits: log1p(e^-|x|); probabilities: min(-log x, 100) and min(-log(1 - x), 100).
inline V valid_logit(V x) { return sel((x >= -600.0) & (x <= 600.0), x, splat(0.0)); }
inline V valid_probability(V x) { return sel((x >= 0.0) & (x <= 1.0), x, splat(0.5)); }

inline D neg_log_x(V xs) {
    const M x_small = xs < 0x1p-200;
    const D a = sel(x_small, from(splat(100.0)), neg(log_dd(from(sel(x_small, splat(1.0), xs)))));
    return sel(a.h >= 100.0, from(splat(100.0)), a);
}
inline D neg_log_1mx(V xs) {
    const M near0 = xs <= 0.2929;
    D u = two_sum(splat(1.0), -xs);  // 1 - x, exactly
    const M u_small = u.h < 0x1p-200;
    u = sel(near0 | u_small, from(splat(0.5)), u);
    D c = neg(sel(near0, log1m_small(sel(near0, xs, splat(0.0))), log_dd(u)));
    c = sel(u_small & ~near0, from(splat(100.0)), c);
    return sel(c.h >= 100.0, from(splat(100.0)), c);
}

// W lanes from element i, given their -log terms; returns the slow mask (-1 where the caller must compute
// the element).
inline M lanes(const LossBlock& b, int64_t i, const D& term1, const D& term2, V* loss_out) {
    const bool logits = b.kind == LOGITS;
    const V x = load(b.x, i);
    V y = load(b.y, i);
    M kept = splat_m(-1);
    if (b.has_ignore) {
        kept = b.ignore_index != b.ignore_index ? M(y == y) : M(y != b.ignore_index);
        y = sel(kept, y, splat(0.0));
    }
    M fast = (y >= 0.0) & (y <= 1.0);
    M tiny = is_tiny(y);
    V w = splat(1.0), p = splat(1.0);
    if (b.w) {
        w = load(b.w, i);
        fast &= (w <= LARGE) & (w >= -LARGE);
        tiny |= is_tiny(w);
    }
    if (b.p) {
        p = load(b.p, i);
        fast &= (p >= 0.0) & (p <= LARGE);
        tiny |= is_tiny(p);
    }
    fast &= logits ? (x >= -600.0) & (x <= 600.0) : (x >= 0.0) & (x <= 1.0);
    if (!logits) tiny |= is_tiny(x);  // -log(1 - x) = x underflows in the lanes' x / (2 - x)
    const V xs = logits ? valid_logit(x) : valid_probability(x);
    y = sel(fast, y, splat(0.0));

    if (logits && !b.w && !b.p && b.label_smoothing == 0.0 && all((y == 0.0) | (y == 1.0))) {
        // 0/1 targets without options: softplus(-x) where y = 1, softplus(x) where y = 0
        const D loss = add(term1, sel(y == 1.0, sel(xs < 0.0, -xs, splat(0.0)), sel(xs > 0.0, xs, splat(0.0))));
        *loss_out = sel(kept, loss.h, splat(0.0));
        return kept & ~fast;
    }
    // y' and 1 - y', each a sum of non-negative terms
    D ys = from(y), ns = two_sum(splat(1.0), -y);
    const double s = b.label_smoothing;
    if (s != 0.0) {
        const D keep = two_sum(splat(1.0), splat(-s));
        ys = add(mul(keep, y), splat(0.5 * s));
        ns = add(mul(keep, ns), splat(0.5 * s));
    }
    D loss;
    if (logits) {
        const D positive = b.p ? mul(ys, p) : ys;
        const D sp_neg = add(term1, sel(xs < 0.0, -xs, splat(0.0)));  // softplus(-x) = -log sigmoid(x)
        const D sp_pos = add(term1, sel(xs > 0.0, xs, splat(0.0)));   // softplus(x)
        loss = add(mul(positive, sp_neg), mul(ns, sp_pos));
    } else {
        loss = add(mul(ys, term1), mul(ns, term2));
    }
    if (b.w) loss = mul(loss, w);
    const V r = loss.h;
    const M small = (r < TINY_RESULT) & (r > -TINY_RESULT);
    fast &= ~(small & ((r != 0.0) | tiny));
    *loss_out = sel(kept, r, splat(0.0));
    return kept & ~fast;
}

// Vectors per block: the stages below run over a whole block before the next one, so that each loop's
// iterations are independent and the CPU overlaps them (one element's computation is a dependency chain
// of a few hundred operations); the block's terms stay in L1.
constexpr int64_t BV = 32;

// A block of n <= BV * W elements, n a multiple of W.
inline int64_t block(const LossBlock& b, double* loss, uint8_t* slow) {
    const int64_t nv = b.n / W;
    D term1[BV], term2[BV];
    if (b.kind == LOGITS) {
        for (int64_t v = 0; v < nv; ++v) {
            const V xs = valid_logit(load(b.x, v * W));
            term1[v] = exp_neg(sel(xs < 0.0, -xs, xs));
        }
        for (int64_t v = 0; v < nv; ++v) term1[v] = log1p_unit(term1[v]);
    } else {
        for (int64_t v = 0; v < nv; ++v) term1[v] = neg_log_x(valid_probability(load(b.x, v * W)));
        for (int64_t v = 0; v < nv; ++v) term2[v] = neg_log_1mx(valid_probability(load(b.x, v * W)));
    }
    M masks[BV];
    M any = M{};
    for (int64_t v = 0; v < nv; ++v) {
        V values;
        masks[v] = lanes(b, v * W, term1[v], b.kind == LOGITS ? term1[v] : term2[v], &values);
        std::memcpy(loss + v * W, &values, sizeof values);
        any |= masks[v];
    }
    bool none = true;
    for (int j = 0; j < W; ++j) none &= any[j] == 0;
    if (none) {  // the common case
        std::memset(slow, 0, size_t(nv * W));
        return 0;
    }
    int64_t slow_count = 0;
    for (int64_t v = 0; v < nv; ++v)
        for (int j = 0; j < W; ++j) {
            slow[v * W + j] = masks[v][j] ? 1 : 0;
            slow_count += masks[v][j] ? 1 : 0;
        }
    return slow_count;
}

}  // namespace dd

// Exact sums of a block in doubles (Rump, Ogita and Oishi's extraction): with sigma = 2^(e + 9) above
// 2^9 times the largest magnitude m < 2^e, q = (sigma + v) - sigma is v rounded to a multiple of
// sigma 2^-53 and v - q is exact; 256 such q sum to less than sigma, so their double sum is exact in any
// order. The remainders are at most sigma 2^-52: the next level takes them, until none is left.
// Writes the levels' sums (at most max_sums) and returns their number; -1 where a value is not finite or
// 2^1000 or more in magnitude (or the levels run out): the caller then adds the values one by one.
inline int64_t level_sums_impl(const double* values, int64_t n, double* sums, int64_t max_sums) {
    constexpr int64_t MAX = 256;
    if (n > MAX) return -1;
    using dd::V;
    using dd::W;
    V r[MAX / W + 1];
    const int64_t nv = (n + W - 1) / W;
    std::memset(static_cast<void*>(r), 0, sizeof(V) * size_t(nv));
    std::memcpy(static_cast<void*>(r), values, sizeof(double) * size_t(n));
    const V sign_off = V(dd::splat_m(0x7fffffffffffffff));
    auto magnitude = [&](const V& v) { return V(dd::M(v) & dd::M(sign_off)); };
    V top{};
    for (int64_t v = 0; v < nv; ++v) top = dd::sel(magnitude(r[v]) > top, magnitude(r[v]), top);
    for (int64_t count = 0;; ++count) {
        double m = 0.0;
        bool finite = true;
        for (int j = 0; j < W; ++j) {
            finite &= top[j] < 0x1p1000;  // false for NaN and infinities
            m = top[j] > m ? top[j] : m;
        }
        if (!finite || count == max_sums) return -1;
        if (m == 0.0) return count;
        int e;
        std::frexp(m, &e);  // m < 2^e
        const V sigma = dd::splat(std::ldexp(1.0, e + 9));
        V total{};
        top = V{};
        for (int64_t v = 0; v < nv; ++v) {
            const V q = (sigma + r[v]) - sigma;
            r[v] = r[v] - q;
            total = total + q;
            top = dd::sel(magnitude(r[v]) > top, magnitude(r[v]), top);
        }
        double level = 0.0;
        for (int j = 0; j < W; ++j) level += total[j];  // partial sums of the q: exact as well
        sums[count] = level;
    }
}

// The block's losses; slow[i] = 1 where element i is left to extended_loss (see kernel_api.h).
inline int64_t losses64_impl(const LossBlock& b, double* loss, uint8_t* slow) {
    constexpr int64_t SPAN = dd::BV * dd::W;
    int64_t slow_count = 0;
    int64_t i = 0;
    LossBlock part = b;
    for (; i + SPAN <= b.n; i += SPAN) {
        part.n = SPAN;
        part.x = b.x + i;
        part.y = b.y + i;
        part.w = b.w ? b.w + i : nullptr;
        part.p = b.p ? b.p + i : nullptr;
        slow_count += dd::block(part, loss + i, slow + i);
    }
    if (i < b.n) {  // the last elements, padded to whole vectors with harmless values
        const int64_t rest = b.n - i, padded = (rest + dd::W - 1) / dd::W * dd::W;
        double x[SPAN], y[SPAN], w[SPAN], p[SPAN], out[SPAN];
        uint8_t flags[SPAN];
        for (int64_t j = 0; j < padded; ++j) {
            const bool in = j < rest;
            x[j] = in ? b.x[i + j] : 0.5;
            y[j] = in ? b.y[i + j] : 0.0;
            w[j] = in && b.w ? b.w[i + j] : 1.0;
            p[j] = in && b.p ? b.p[i + j] : 1.0;
        }
        part.n = padded;
        part.x = x;
        part.y = y;
        part.w = b.w ? w : nullptr;
        part.p = b.p ? p : nullptr;
        dd::block(part, out, flags);
        for (int64_t j = 0; j < rest; ++j) {
            loss[i + j] = out[j];
            slow[i + j] = flags[j];
            slow_count += flags[j];
        }
    }
    return slow_count;
}

}  // namespace BCEKIT_ISA
}  // namespace bcekit
