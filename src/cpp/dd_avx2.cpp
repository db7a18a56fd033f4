// The double-double float64 loss (dd_kernel.h) built for AVX2 + FMA (x86-64; chosen at run time when the CPU has both).
#define BCEKIT_ISA isa_avx2
#include "dd_kernel.h"

namespace bcekit::isa_avx2 {
int64_t losses64(const LossBlock& b, double* loss, uint8_t* slow) { return losses64_impl(b, loss, slow); }
int64_t level_sums(const double* values, int64_t n, double* sums, int64_t max_sums) {
    return level_sums_impl(values, n, sums, max_sums);
}
}  // namespace bcekit::isa_avx2
