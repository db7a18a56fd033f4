// A strict reader of plain numeric CSV lines, for bcekit score's CSV files.
//
// It reads only what it can read exactly as pyarrow's text-to-float64 cast does, and says "no" to the rest,
// which the Python layer then hands to pyarrow: a field is a decimal number ([+-]digits[.digits][e[+-]digits]),
// correctly rounded (both are), or nan / inf / infinity in any case with an optional sign. Anything else is
// refused: quotes, a space or tab next to a number, an empty field, another field count than the header's,
// a number beyond float64's range (pyarrow makes it an infinity or zero), other letters. A line ends at \n,
// \r\n, or the data's end. Fields not read may hold anything but quotes and line ends.
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <system_error>

#include "dd_tables.h"
#include "kernel_api.h"

namespace bcekit {
namespace {

inline char lower(char c) { return (c >= 'A' && c <= 'Z') ? char(c - 'A' + 'a') : c; }

bool equals_lower(const char* b, const char* e, const char* word) {
    const size_t n = std::strlen(word);
    if (size_t(e - b) != n) return false;
    for (size_t i = 0; i < n; ++i)
        if (lower(b[i]) != word[i]) return false;
    return true;
}

// a b - p exactly, for p = fl(a b) (Dekker's product; this file is built without FMA contraction, and the
// baseline build has no FMA instruction)
inline double two_prod_low(double a, double b, double p) {
    constexpr double split = 134217729.0;  // 2^27 + 1
    const double ta = split * a, ah = ta - (ta - a), al = a - ah;
    const double tb = split * b, bh = tb - (tb - b), bl = b - bh;
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl;
}

// Whether the 8 bytes (little-endian) are all ASCII digits, and their value (the well-known SWAR method:
// pairs, then quadruples, then the eight combined by multiplications).
constexpr bool LITTLE_ENDIAN_CPU = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
inline bool all_digits(uint64_t v) {
    return (((v & 0xF0F0F0F0F0F0F0F0) | (((v + 0x0606060606060606) & 0xF0F0F0F0F0F0F0F0) >> 4)) ==
            0x3333333333333333);
}
inline uint64_t eight_digits(uint64_t v) {
    v -= 0x3030303030303030;
    v = (v * 10) + (v >> 8);
    v = (((v & 0x000000FF000000FF) * 0x000F424000000064) +
         (((v >> 16) & 0x000000FF000000FF) * 0x0000271000000001)) >>
        32;
    return v;
}

// [digits][.digits][(e|E)[+-]digits] from p on, correctly rounded, where that is quick to do and to be sure
// of: w 10^q with w the (at most 19) significant digits and |q| <= 22, so that 10^|q| is exact. w <= 2^53:
// one correctly rounded multiplication or division (Clinger). Else w 10^q in double-double (w times 10^q,
// or times 10^-|q| from a double-double table; below 2^-95 relative in all), rounded once, unless the
// result lies so close to a midpoint between two doubles that the error could matter. Returns where the
// number ends, or nullptr: not decided here (from_chars decides, with the same grammar).
const char* decimal(const char* p, const char* e, double& value) {
    static constexpr double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                       1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    uint64_t w = 0;
    int digits = 0, any = 0;  // digits in w (an upper bound: leading zeros read 8 at a time count too)
    int64_t q = 0;
    const char* s = p;
    bool in_fraction = false;
    auto eight = [&]() {  // 8 digits at once, while w stays below 10^19
        while (LITTLE_ENDIAN_CPU && e - s >= 8 && digits + 8 <= 19) {
            uint64_t block;
            std::memcpy(&block, s, sizeof block);
            if (!all_digits(block)) break;
            w = w * 100000000 + eight_digits(block);
            digits += 8;
            any += 8;
            s += 8;
            q -= in_fraction ? 8 : 0;
        }
    };
    eight();
    for (; s < e && *s >= '0' && *s <= '9'; ++s, ++any) {
        if (w == 0 && *s == '0') continue;  // leading zeros
        if (++digits > 19) return nullptr;
        w = w * 10 + uint64_t(*s - '0');
    }
    if (s < e && *s == '.') {
        ++s;
        in_fraction = true;
        eight();
        for (; s < e && *s >= '0' && *s <= '9'; ++s, ++any) {
            --q;
            if (w == 0 && *s == '0') continue;
            if (++digits > 19) return nullptr;
            w = w * 10 + uint64_t(*s - '0');
        }
    }
    if (!any) return nullptr;
    if (s < e && (*s == 'e' || *s == 'E')) {
        const char* t = s + 1;
        bool minus = false;
        if (t < e && (*t == '+' || *t == '-')) minus = *t++ == '-';
        if (t == e || *t < '0' || *t > '9') return nullptr;
        int64_t x = 0;
        for (; t < e && *t >= '0' && *t <= '9'; ++t)
            if (x < 100000) x = x * 10 + (*t - '0');
        q += minus ? -x : x;
        s = t;
    }
    if (w == 0) {
        value = 0.0;
        return s;
    }
    if (q < -22 || q > 22) return nullptr;
    const double power = POW10[q < 0 ? -q : q];
    if (w <= (uint64_t(1) << 53)) {
        value = q < 0 ? double(w) / power : double(w) * power;
        return s;
    }
    const double w_hi = double(w);  // w = w_hi + w_lo exactly
    const double w_lo = double(int64_t(w - uint64_t(w_hi)));
    double h, l;
    if (q >= 0) {
        h = w_hi * power;
        l = two_prod_low(w_hi, power, h) + w_lo * power;
    } else {  // times 10^-|q| in double-double, rather than two dependent divisions
        const double p_hi = dd_tables::POW10_NEG_HI[-q], p_lo = dd_tables::POW10_NEG_LO[-q];
        h = w_hi * p_hi;
        l = two_prod_low(w_hi, p_hi, h) + (w_hi * p_lo + w_lo * p_hi);
    }
    const double rounded = h + l;
    const double rest = l - (rounded - h);  // rounded + rest = h + l
    // the midpoints next to `rounded`, and how far h + l lies from them, against the error bound
    uint64_t bits;  // rounded > 0, normal and finite: its neighbours are the next bit patterns
    std::memcpy(&bits, &rounded, sizeof bits);
    double above, below;
    const uint64_t next = bits + 1, previous = bits - 1;
    std::memcpy(&above, &next, sizeof above);
    std::memcpy(&below, &previous, sizeof below);
    const double up = (above - rounded) / 2, down = (rounded - below) / 2;
    const double bound = rounded * 0x1p-90;  // the error is below 2^-95 of it
    if (std::fabs(std::fabs(rest) - up) <= bound || std::fabs(std::fabs(rest) - down) <= bound) return nullptr;
    value = rounded;
    return s;
}

// A number from b on, up to e; returns where it ends (nullptr: none, or one pyarrow reads otherwise).
const char* parse_number(const char* b, const char* e, double& value) {
    if (b == e) return nullptr;
    if (e - b >= 2 && b[0] >= '0' && b[0] <= '9' && (b[1] == ',' || b[1] == '\n' || b[1] == '\r')) {
        value = double(b[0] - '0');  // one digit: 0/1 targets
        return b + 1;
    }
    const char* p = b;
    bool negative = false;
    if (*p == '+' || *p == '-') {
        negative = *p == '-';
        ++p;
        if (p == e) return nullptr;
    }
    const char c = lower(*p);
    if (c == 'n' || c == 'i') {
        const char* stop = p;
        while (stop < e && ((*stop >= 'a' && *stop <= 'z') || (*stop >= 'A' && *stop <= 'Z'))) ++stop;
        if (equals_lower(p, stop, "nan")) {
            value = std::numeric_limits<double>::quiet_NaN();
        } else if (equals_lower(p, stop, "inf") || equals_lower(p, stop, "infinity")) {
            value = negative ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
        } else {
            return nullptr;
        }
        return stop;
    }
    // from_chars would also take a "-" after the "+" we skipped
    if (!((c >= '0' && c <= '9') || c == '.')) return nullptr;
    double parsed;
    const char* stop = decimal(p, e, parsed);
    if (!stop) {  // more than 19 digits, a large exponent, or a rounding too close to call: the slow way
        const std::from_chars_result r = std::from_chars(p, e, parsed, std::chars_format::general);
        if (r.ec != std::errc()) return nullptr;  // not a number, or beyond float64's range
        stop = r.ptr;
    }
    value = negative ? -parsed : parsed;
    return stop;
}

}  // namespace

int64_t parse_csv_lines(const char* begin, const char* end, int n_fields, const int* slot, double* const* out,
                        int64_t row0, int64_t capacity) {
    int64_t row = row0;
    const char* p = begin;
    while (p < end) {
        if (row >= capacity) return -1;
        for (int f = 0; f < n_fields; ++f) {
            if (slot[f] >= 0) {
                double value;
                p = parse_number(p, end, value);
                if (!p) return -1;
                out[slot[f]][row] = value;
            } else {  // not read, but a quote could hide a comma or a line end
                for (; p < end && *p != ',' && *p != '\n' && *p != '\r'; ++p)
                    if (*p == '"') return -1;
            }
            // a field ends at a comma, the last at the line's end (\n, \r\n, or the data's end): else
            // another field count, or something after the number (a space, a quote, ...)
            if (f + 1 < n_fields) {
                if (p == end || *p != ',') return -1;
                ++p;
            } else if (p < end) {
                if (*p == '\r') ++p;
                if (p < end && *p++ != '\n') return -1;  // a lone \r ends a line for pyarrow
            }
        }
        ++row;
    }
    return row - row0;
}

}  // namespace bcekit
