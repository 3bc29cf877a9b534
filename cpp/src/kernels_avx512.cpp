// AVX-512 build of the SIMD kernels (this file alone is compiled with -mavx512f etc.).
#define NPLORA_KERNEL_ISA avx512
#define NPLORA_KERNEL_AVX512 1
#include "kernels_impl.inc"
