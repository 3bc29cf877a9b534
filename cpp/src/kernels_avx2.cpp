// AVX2 + FMA build of the SIMD kernels (this file alone is compiled with -mavx2 -mfma).
#define NPLORA_KERNEL_ISA avx2
#define NPLORA_KERNEL_AVX512 0
#include "kernels_impl.inc"
