// The double-double float64 loss (dd_kernel.h) built for the baseline instruction set (any CPU of the architecture).
#define BCEKIT_ISA isa_baseline
#include "dd_kernel.h"

namespace bcekit::isa_baseline {
int64_t losses64(const LossBlock& b, double* loss, uint8_t* slow) { return losses64_impl(b, loss, slow); }
}  // namespace bcekit::isa_baseline
