// The vector kernel built for AVX2 + FMA (x86-64 only; chosen at run time when the CPU has both).
#define BCEKIT_ISA isa_avx2
#include "vector_kernel.h"

namespace bcekit::isa_avx2 {
ChunkFn vector_kernel(int dtype) { return vector_kernel_impl(dtype); }
bool elementwise(const char* name, const double* in, double* out, int64_t n) {
    return elementwise_impl(name, in, out, n);
}
}  // namespace bcekit::isa_avx2
