#include "nplora/gemm.hpp"

#include "nplora/kernels.hpp"
#include "nplora/parallel.hpp"

#include <atomic>
#include <cstdint>
#include <mutex>

namespace nplora {
namespace {

constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;

template <class T, class Int>
using CblasFn = void (*)(int, int, int, Int, Int, Int, T, const T*, Int, const T*, Int, T, T*, Int);

// The CBLAS functions and their integer width change together (use_blas), so they are read together.
std::mutex g_cblas_mutex;
CblasGemm g_cblas;  // guarded by g_cblas_mutex
// Per element type: on this Zen 4 the packed kernels beat OpenBLAS's sgemm but not its dgemm.
std::atomic<bool> g_own_float{true};
std::atomic<bool> g_own_double{true};

template <class T>
bool own_for() {
    return sizeof(T) == sizeof(float) ? g_own_float.load() : g_own_double.load();
}

template <class T>
void* blas_entry(const CblasGemm& functions) {
    return sizeof(T) == sizeof(float) ? functions.sgemm : functions.dgemm;
}

template <class T, class Int>
void call_cblas(void* fn, Trans ta, Trans tb, Index m, Index n, Index k, T alpha, const T* a,
                Index lda, const T* b, Index ldb, T beta, T* c, Index ldc) {
    reinterpret_cast<CblasFn<T, Int>>(fn)(
        kCblasRowMajor, ta == Trans::No ? kCblasNoTrans : kCblasTrans,
        tb == Trans::No ? kCblasNoTrans : kCblasTrans, static_cast<Int>(m), static_cast<Int>(n),
        static_cast<Int>(k), alpha, a, static_cast<Int>(lda), b, static_cast<Int>(ldb), beta, c,
        static_cast<Int>(ldc));
}

// Eigen's product, one block of C's rows (or columns, whichever is longer) per pool thread:
// Eigen is built without OpenMP, so this is where its parallelism comes from.
template <class T, class OpA, class OpB>
void eigen_product(const OpA& op_a, const OpB& op_b, Index m, Index n, T alpha, T beta, T* c,
                   Index ldc) {
    RowMap<T> C(c, m, n, Eigen::OuterStride<>(ldc));
    auto block = [&](auto&& c_part, auto&& a_part, auto&& b_part) {
        if (beta == T(0)) {
            c_part.noalias() = alpha * (a_part * b_part);
        } else {
            if (beta != T(1)) c_part *= beta;
            c_part.noalias() += alpha * (a_part * b_part);
        }
    };
    constexpr Index kMinBlock = 32;
    if (m >= n) {
        parallel_for(m, kMinBlock, [&](Index begin, Index end) {
            block(C.middleRows(begin, end - begin), op_a.middleRows(begin, end - begin), op_b);
        });
    } else {
        parallel_for(n, kMinBlock, [&](Index begin, Index end) {
            block(C.middleCols(begin, end - begin), op_a, op_b.middleCols(begin, end - begin));
        });
    }
}

template <class T>
void eigen_gemm(Trans ta, Trans tb, Index m, Index n, Index k, T alpha, const T* a, Index lda,
                const T* b, Index ldb, T beta, T* c, Index ldc) {
    const ConstRowMap<T> A(a, ta == Trans::No ? m : k, ta == Trans::No ? k : m,
                           Eigen::OuterStride<>(lda));
    const ConstRowMap<T> B(b, tb == Trans::No ? k : n, tb == Trans::No ? n : k,
                           Eigen::OuterStride<>(ldb));
    if (ta == Trans::No && tb == Trans::No)
        eigen_product(A, B, m, n, alpha, beta, c, ldc);
    else if (ta == Trans::No)
        eigen_product(A, B.transpose(), m, n, alpha, beta, c, ldc);
    else if (tb == Trans::No)
        eigen_product(A.transpose(), B, m, n, alpha, beta, c, ldc);
    else
        eigen_product(A.transpose(), B.transpose(), m, n, alpha, beta, c, ldc);
}

}  // namespace

template <class T>
void gemm(Trans ta, Trans tb, Index m, Index n, Index k, T alpha, const T* a, Index lda, const T* b,
          Index ldb, T beta, T* c, Index ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == T(0)) {  // as BLAS: A and B are not read, C = beta C
        RowMap<T> C(c, m, n, Eigen::OuterStride<>(ldc));
        if (beta == T(0))
            C.setZero();
        else
            C *= beta;
        return;
    }
    if (own_for<T>()) {
        const GemmArgs<T> args{a,       lda, ta == Trans::Yes, b,       ldb, tb == Trans::Yes, k,
                               nullptr, 0,   0,                nullptr, 0,   0,                0,
                               nullptr, alpha, beta,           c,       ldc, m,                n};
        if (packed_gemm(args)) return;
    }
    const CblasGemm cblas = get_cblas_gemm();
    if (void* fn = blas_entry<T>(cblas)) {
        if (cblas.ilp64)
            call_cblas<T, std::int64_t>(fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        else
            call_cblas<T, int>(fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    eigen_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <class T>
void gemm_fused(const GemmArgs<T>& a) {
    if (a.m <= 0 || a.n <= 0) return;
    // alpha == 0 goes the long way, where gemm() leaves X and W unread as BLAS does.
    if (a.alpha != T(0) && own_for<T>() && packed_gemm(a)) return;
    const Trans tx = a.x_trans ? Trans::Yes : Trans::No, tw = a.w_trans ? Trans::Yes : Trans::No;
    gemm(tx, tw, a.m, a.n, a.k, a.alpha, a.x, a.ldx, a.w, a.ldw, a.beta, a.c, a.ldc);
    if (a.bias) {
        const Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> bias_row(a.bias, a.n);
        RowMap<T>(a.c, a.m, a.n, Eigen::OuterStride<>(a.ldc)).rowwise() += bias_row;
    }
    if (a.x2 && a.k2 > 0)
        gemm(a.x2_trans ? Trans::Yes : Trans::No, a.w2_trans ? Trans::Yes : Trans::No, a.m, a.n, a.k2,
             a.alpha, a.x2, a.ldx2, a.w2, a.ldw2, T(1), a.c, a.ldc);
}

void set_own_gemm(bool for_float, bool for_double) {
    g_own_float = for_float;
    g_own_double = for_double;
}
bool own_gemm_enabled(bool for_double) { return for_double ? g_own_double.load() : g_own_float.load(); }

void set_cblas_gemm(const CblasGemm& functions) {
    std::lock_guard<std::mutex> lock(g_cblas_mutex);
    g_cblas = functions;
}

CblasGemm get_cblas_gemm() {
    std::lock_guard<std::mutex> lock(g_cblas_mutex);
    return g_cblas;
}

template void gemm<float>(Trans, Trans, Index, Index, Index, float, const float*, Index, const float*,
                          Index, float, float*, Index);
template void gemm<double>(Trans, Trans, Index, Index, Index, double, const double*, Index,
                           const double*, Index, double, double*, Index);
template void gemm_fused<float>(const GemmArgs<float>&);
template void gemm_fused<double>(const GemmArgs<double>&);

}  // namespace nplora
