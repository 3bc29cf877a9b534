// The one matrix product the core is built on, with a pluggable BLAS behind it.
#pragma once

#include "nplora/kernel_args.h"
#include "nplora/types.hpp"

namespace nplora {

enum class Trans { No, Yes };

// Row-major C (m x n) = alpha * op(A) * op(B) + beta * C, op(A) being m x k and op(B) k x n.
// With beta == 0, C is written without being read (it may hold NaNs). lda, ldb, ldc are row strides.
template <class T>
void gemm(Trans trans_a, Trans trans_b, Index m, Index n, Index k, T alpha, const T* a, Index lda,
          const T* b, Index ldb, T beta, T* c, Index ldc);

// The fused form: C = alpha (X Wop + X2 W2op) + beta C (+ bias), see GemmArgs. Runs on nplora's
// packed kernels when they are in use (own_gemm_enabled() and a SIMD kernel for this CPU), else as
// separate gemm calls on whichever backend is set.
template <class T>
void gemm_fused(const GemmArgs<T>& args);

// Whether float / double products run on nplora's own packed kernels (where the CPU has AVX2 or
// AVX-512) rather than the CBLAS below or Eigen.
void set_own_gemm(bool for_float, bool for_double);
bool own_gemm_enabled(bool for_double);

// CBLAS entry points found at run time (e.g. the BLAS NumPy itself links), so the core shares
// NumPy's thread pool instead of starting a second one. Null pointers mean "use Eigen".
// `ilp64` tells whether the integer arguments are 64-bit.
struct CblasGemm {
    void* sgemm = nullptr;
    void* dgemm = nullptr;
    bool ilp64 = false;
};
void set_cblas_gemm(const CblasGemm& functions);
CblasGemm get_cblas_gemm();

}  // namespace nplora
