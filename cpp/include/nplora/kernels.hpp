// Hand-written SIMD kernels with run-time dispatch (AVX-512, AVX2+FMA), for the shapes where a
// general BLAS product is far from the machine's limit.
#pragma once

#include "nplora/kernel_args.h"
#include "nplora/types.hpp"

namespace nplora {

// Which instruction set the kernels use: "avx512", "avx2" or "none" (NPLORA_ISA may lower it).
const char* kernel_isa();

// y = x W^T (+ bias) (+ xs B^T) for a small batch, W [out, in] row-major, read once per call.
// Returns false (doing nothing) when no SIMD kernel is available on this CPU.
template <class T>
bool small_batch_linear(const SmallBatchArgs<T>& args);

// C = alpha (X Wop + X2 W2op) + beta C (+ bias) on the packed AVX kernels, threaded over
// nplora's pool. Returns false (doing nothing) when no SIMD kernel is available or k + k2 == 0.
template <class T>
bool packed_gemm(const GemmArgs<T>& args);

// Batches up to this many rows take small_batch_linear; larger ones a BLAS-class product.
constexpr Index kSmallBatchMaxRows = 64;

}  // namespace nplora
