// What the kernel dispatchers (kernels.cpp, kernels_gemm.cpp) share: the instruction set the SIMD
// kernels run on, chosen once at run time.
#pragma once

#include "nplora/types.hpp"

namespace nplora {
namespace dispatch {

enum class Isa { None, Avx2, Avx512 };

// This CPU's best (AVX-512 needs F, VL and DQ; AVX2 needs FMA); NPLORA_ISA may lower it.
Isa isa();

#if defined(NPLORA_HAVE_X86_KERNELS)
// The vector width of the chosen kernels, in elements.
Index lanes_of(Isa chosen, float);
Index lanes_of(Isa chosen, double);
#endif

}  // namespace dispatch
}  // namespace nplora
