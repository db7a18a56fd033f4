// The double-double float64 loss (dd_kernel.h) built for AVX2 + FMA (x86-64; chosen at run time when the CPU has both).
#define BCEKIT_ISA isa_avx2
#include "dd_kernel.h"

namespace bcekit::isa_avx2 {
int64_t losses64(const LossBlock& b, double* loss, uint8_t* slow) { return losses64_impl(b, loss, slow); }
}  // namespace bcekit::isa_avx2
