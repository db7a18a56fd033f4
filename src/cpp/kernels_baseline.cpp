// The vector kernel built for the architecture's baseline (SSE2 on x86-64, NEON on aarch64).
#define BCEKIT_ISA isa_baseline
#include "vector_kernel.h"

namespace bcekit::isa_baseline {
ChunkFn vector_kernel(int dtype) { return vector_kernel_impl(dtype); }
bool elementwise(const char* name, const double* in, double* out, int64_t n) {
    return elementwise_impl(name, in, out, n);
}
}  // namespace bcekit::isa_baseline
