// The one matrix product the core is built on, with a pluggable BLAS behind it.
#pragma once

#include "nplora/types.hpp"

namespace nplora {

enum class Trans { No, Yes };

// Row-major C (m x n) = alpha * op(A) * op(B) + beta * C, op(A) being m x k and op(B) k x n.
// With beta == 0, C is written without being read (it may hold NaNs). lda, ldb, ldc are row strides.
template <class T>
void gemm(Trans trans_a, Trans trans_b, Index m, Index n, Index k, T alpha, const T* a, Index lda,
          const T* b, Index ldb, T beta, T* c, Index ldc);

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
