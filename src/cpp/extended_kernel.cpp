// float64 storage: the loss in the double-double lanes of dd_kernel.h (Args::losses64) block by block, and
// in long double with libm, rounded once, for the elements outside their range (extended_loss); the
// gradients in double.
//
// On x86-64 Linux long double is the x87 80-bit format (64-bit significand), which puts libm's ~1 ulp
// error 11 bits below float64's last digit: the same reasoning and the same formulas as the NumPy
// long double path of bcekit._numpy_core. The Python layer sends float64 here only where long double has
// a 64-bit significand (see core.cpp: extended_float64); elsewhere float64 takes the composed path.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernel_api.h"

namespace bcekit {

namespace {

using R = long double;

// Element i of float64 data at any address: the operands may be misaligned (a NumPy view at an odd
// byte offset, a tensor over a byte buffer), where reading through a double* is undefined; memcpy is
// defined for any address and compiles to the same single move.
inline double load(const void* data, int64_t i) {
    double v;
    std::memcpy(&v, static_cast<const char*>(data) + i * int64_t(sizeof v), sizeof v);
    return v;
}
inline void store(void* data, int64_t i, double v) {
    std::memcpy(static_cast<char*>(data) + i * int64_t(sizeof v), &v, sizeof v);
}

struct BroadcastReader {
    const void* data;
    int mode;
    int64_t inner, col, row;
    BroadcastReader(const void* p, int mode_, int64_t inner_, int64_t begin)
        : data(p), mode(p ? mode_ : ABSENT), inner(inner_ > 0 ? inner_ : 1), col(begin % inner),
          row(begin / inner) {}
    R next(int64_t i) {
        R v = 1.0L;
        switch (mode) {
            case SCALAR: v = load(data, 0); break;
            case FULL: v = load(data, i); break;
            case PER_CLASS: v = load(data, col); break;
            case PER_ROW: v = load(data, row); break;
            default: break;
        }
        if (++col == inner) { col = 0; ++row; }
        return v;
    }
};

inline R scaled(R c, R v) { return (c == 0 && std::isinf(v)) ? R(0) : c * v; }

// The loss of one element with its target already smoothed (yv) and before the weight.
inline R element_loss(bool logits, R xv, R yv, R pv, bool has_p) {
    if (logits) {
        const R e = std::exp(-std::fabs(xv));
        const R positive = has_p ? pv * yv : yv;
        const R x_pos = xv > 0 ? xv : (std::isnan(xv) ? xv : R(0));
        const R x_neg = xv < 0 ? -xv : (std::isnan(xv) ? xv : R(0));
        const R tail = std::log1p(e);
        return scaled(positive, x_neg + tail) + scaled(1 - yv, x_pos + tail);
    }
    return yv * std::fmin(-std::log(xv), R(100)) + (1 - yv) * std::fmin(-std::log1p(-xv), R(100));
}

// Element i of the block (a kept one) as extended_chunk computes it, rounded once.
double extended_loss(const LossBlock& b, int64_t i) {
    const R s = b.label_smoothing;
    R yv = b.y[i];
    if (s != 0) yv = yv * (1 - s) + s / 2;
    R loss = element_loss(b.kind == LOGITS, b.x[i], yv, b.p ? b.p[i] : 1.0, b.p != nullptr);
    if (b.w) loss *= R(b.w[i]);
    return double(loss);
}

}  // namespace

ChunkResult extended_chunk(const Args& a, int64_t begin, int64_t end) {
    const void* g = a.grad_output;
    void* const loss_out = a.loss;
    void* const gi_out = a.grad_input;
    void* const gt_out = a.grad_target;
    const bool logits = a.kind == LOGITS;
    const bool need_loss = loss_out || a.want_sum;
    const bool has_w = a.w != nullptr, has_p = a.p != nullptr;
    const bool nan_ignore = a.has_ignore && std::isnan(a.ignore_index);
    BroadcastReader wr(a.w, a.w_mode, a.w_inner, begin), pr(a.p, a.p_mode, a.p_inner, begin);
    ChunkResult result;
    int64_t kept_count = 0;

    // The loss of a block at a time in the double-double lanes (their slow elements here, in long double),
    // the rest element by element.
    constexpr int64_t BLOCK = 256;
    double xs[BLOCK], ys[BLOCK], ws[BLOCK], ps[BLOCK], losses[BLOCK];
    uint8_t slow[BLOCK];
    for (int64_t start = begin; start < end; start += BLOCK) {
        const int64_t count = std::min(BLOCK, end - start);
        for (int64_t j = 0; j < count; ++j) {
            xs[j] = load(a.x, start + j);
            ys[j] = load(a.y, start + j);
            ws[j] = double(wr.next(start + j));
            ps[j] = double(pr.next(start + j));
        }
        if (need_loss) {
            LossBlock b;
            b.kind = a.kind;
            b.n = count;
            b.x = xs;
            b.y = ys;
            b.w = has_w ? ws : nullptr;
            b.p = has_p ? ps : nullptr;
            b.label_smoothing = a.label_smoothing;
            b.has_ignore = a.has_ignore;
            b.ignore_index = a.ignore_index;
            exact_losses64(a.losses64, b, losses, slow);
        }
        for (int64_t j = 0; j < count; ++j) {
            const int64_t i = start + j;
            const double x_i = xs[j], y_i = ys[j];
            bool kept = true;
            if (a.has_ignore) kept = nan_ignore ? !std::isnan(y_i) : y_i != a.ignore_index;
            kept_count += kept;
            if (!logits) {  // the [0, 1] checks of the probability loss (NaN fails both comparisons)
                result.bad_input |= !(x_i >= 0 && x_i <= 1);
                result.bad_target |= kept && !(y_i >= 0 && y_i <= 1);
            }
            if (need_loss) {
                const double loss = kept ? losses[j] : 0.0;
                if (loss_out) store(loss_out, i, loss);
                result.sum += loss;
            }
            if (gi_out || gt_out) {
                // Gradients carry no accuracy promise beyond torch's: they are the composed float64 formulas
                // (bcekit._math), evaluated in double in the same order, so they agree with them bitwise.
                const double xd = x_i, wd = has_w ? ws[j] : 1.0, pd = has_p ? ps[j] : 1.0;
                double yd = kept ? y_i : 0.0;
                if (a.label_smoothing != 0.0) yd = yd * (1.0 - a.label_smoothing) + 0.5 * a.label_smoothing;
                const double scale = g ? load(g, i) * a.grad_scale : a.grad_scale;
                double gi = 0, gt = 0;
                if (logits) {
                    const double e = std::exp(-std::fabs(xd));
                    const double large = 1.0 / (1.0 + e), small = e / (1.0 + e);
                    const double positive = has_p ? pd * yd : yd;
                    gi = (1.0 - yd) * (xd >= 0 ? large : small) - positive * (xd >= 0 ? small : large);
                    if (gt_out) {
                        if (has_p) {
                            const double x_pos = xd > 0 ? xd : (std::isnan(xd) ? xd : 0.0);
                            const double x_neg = xd < 0 ? -xd : (std::isnan(xd) ? xd : 0.0);
                            const double tail = std::abs(e) < 0x1p-54 ? e : std::log1p(e);
                            const double sp_neg = x_neg + tail;
                            gt = ((pd == 0 && std::isinf(sp_neg)) ? 0.0 : pd * sp_neg) - (x_pos + tail);
                        } else {
                            gt = -xd;
                        }
                    }
                } else {
                    double denom = xd * (1.0 - xd);
                    if (!(denom > GRAD_EPSILON)) denom = GRAD_EPSILON;
                    gi = (xd - yd) / denom;
                    const double log_1mx = std::abs(xd) < 0x1p-54 ? -xd : std::log1p(-xd);
                    gt = log_1mx - std::log(xd);
                }
                if (gi_out) {
                    if (has_w) gi *= wd;
                    store(gi_out, i, (kept ? gi : 0.0) * scale);
                }
                if (gt_out) {
                    if (a.label_smoothing != 0.0) gt *= 1.0 - a.label_smoothing;
                    if (has_w) gt *= wd;
                    store(gt_out, i, (kept ? gt : 0.0) * scale);
                }
            }
        }
    }
    result.kept = kept_count;
    return result;
}


int64_t exact_losses64(LossBlockFn lanes, const LossBlock& b, double* loss, uint8_t* slow) {
    int64_t count = b.n;
    if (lanes) {
        count = lanes(b, loss, slow);
    } else {
        std::fill(slow, slow + b.n, uint8_t(1));
    }
    if (count)
        for (int64_t i = 0; i < b.n; ++i)
            if (slow[i]) loss[i] = extended_loss(b, i);
    return count;
}

}  // namespace bcekit
