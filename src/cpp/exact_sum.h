// An exact sum of float64 values: a fixed-point integer in units of 2^-1074 (the smallest subnormal), which
// every finite double is a whole multiple of, held in 32-bit digits with room for carries.
//
// Adding is exact and order-free (integer addition), so a sum formed in any order, over any split into
// chunks, threads or batches, is the same number. Infinities and NaN are counted apart; the Python layer
// turns the digits into one integer and applies IEEE's rules (inf - inf is NaN).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace bcekit {

class ExactSum {
  public:
    // 70 digits of 32 bits: a double spans bit 0 (2^-1074) to bit 2097 (2^1024), and 2^60 of them
    // carry into bit 2157 at most; the top digit is signed.
    static constexpr int DIGITS = 70;

    // Adds values[0, n): a value's digits go to one of four copies in turn, so that consecutive values of
    // the same magnitude (adding to the same digits) do not wait on each other's stores.
    void add(const double* values, int64_t n) {
        int64_t i = 0;
        for (; i + 4 <= n; i += 4)
            for (int k = 0; k < 4; ++k) add_to(copies_[k], values[i + k]);
        for (; i < n; ++i) add_to(copies_[0], values[i]);
        pending_ += (n + 3) / 4;
        if (pending_ >= MAX_PENDING) normalize();
    }

    void add(double v) {
        add_to(copies_[0], v);
        if (++pending_ >= MAX_PENDING) normalize();
    }

  private:
    using Digits = int64_t[DIGITS];
    void add_to(Digits& digits, double v) {
        uint64_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        const bool negative = bits >> 63;
        int64_t exponent = int64_t((bits >> 52) & 0x7ff);
        uint64_t mantissa = bits & ((uint64_t(1) << 52) - 1);
        if (exponent == 0x7ff) {
            if (mantissa) {
                ++nan_;
            } else {
                ++(negative ? neg_inf_ : pos_inf_);
            }
            return;
        }
        if (exponent) {
            mantissa |= uint64_t(1) << 52;
        } else {
            exponent = 1;  // subnormal: the same scale as the smallest normal
        }
        if (!mantissa) return;
        const int64_t position = exponent - 1;  // v = mantissa * 2^(position - 1074)
        const int64_t digit = position >> 5;
        const unsigned __int128 shifted = static_cast<unsigned __int128>(mantissa) << (position & 31);
        const int64_t d0 = int64_t(uint64_t(shifted) & 0xffffffffu);
        const int64_t d1 = int64_t(uint64_t(shifted >> 32) & 0xffffffffu);
        const int64_t d2 = int64_t(uint64_t(shifted >> 64));
        if (negative) {
            digits[digit] -= d0;
            digits[digit + 1] -= d1;
            digits[digit + 2] -= d2;
        } else {
            digits[digit] += d0;
            digits[digit + 1] += d1;
            digits[digit + 2] += d2;
        }
    }

  public:
    void add(const ExactSum& other) {
        for (int k = 0; k < 4; ++k)
            for (int i = 0; i < DIGITS; ++i) copies_[k][i] += other.copies_[k][i];
        pos_inf_ += other.pos_inf_;
        neg_inf_ += other.neg_inf_;
        nan_ += other.nan_;
        pending_ += other.pending_ + 1;
        if (pending_ >= MAX_PENDING / 2) normalize();
    }

    // The copies added into the first and carries propagated: digits 0 .. DIGITS-2 in [0, 2^32), the top
    // one signed.
    void normalize() {
        int64_t* digits = copies_[0];
        for (int i = 0; i < DIGITS; ++i)
            for (int k = 1; k < 4; ++k) {
                digits[i] += copies_[k][i];
                copies_[k][i] = 0;
            }
        for (int i = 0; i + 1 < DIGITS; ++i) {
            const int64_t carry = digits[i] >> 32;  // arithmetic shift: floor division
            digits[i] -= carry * (int64_t(1) << 32);
            digits[i + 1] += carry;
        }
        pending_ = 0;
    }

    // The sum as little-endian two's-complement bytes (Python: int.from_bytes(b, "little", signed=True)).
    std::string bytes() {
        normalize();
        std::string out(size_t(DIGITS) * 4, '\0');
        for (int i = 0; i < DIGITS; ++i) {
            const uint32_t d = uint32_t(uint64_t(copies_[0][i]));
            for (int k = 0; k < 4; ++k) out[size_t(i) * 4 + size_t(k)] = char((d >> (8 * k)) & 0xff);
        }
        return out;
    }

    int64_t pos_inf() const { return pos_inf_; }
    int64_t neg_inf() const { return neg_inf_; }
    int64_t nan() const { return nan_; }

  private:
    // each add moves a digit of a copy by less than 2^32; 2^28 adds per copy (four copies summed into one
    // by normalize) keep every digit below 2^62
    static constexpr int64_t MAX_PENDING = int64_t(1) << 28;
    int64_t copies_[4][DIGITS] = {};
    int64_t pending_ = 0;
    int64_t pos_inf_ = 0, neg_inf_ = 0, nan_ = 0;
};

}  // namespace bcekit
