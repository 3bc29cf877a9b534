/* Plain argument blocks shared by the dispatcher and the per-ISA kernel files. Deliberately free of
   inline functions and templates with external linkage: the ISA files are compiled with AVX flags,
   and any inline code they emitted could be picked by the linker for generic callers. */
#pragma once

#include <cstddef>

namespace nplora {

/* y[b, o] = sum_k x[b, k] W[o, k] + bias[o] + sum_j xs[b, j] B[o, j], for b < n, o < out. */
template <class T>
struct SmallBatchArgs {
    const T* w;      /* [out, in], row stride ldw */
    std::ptrdiff_t ldw;
    const T* x;      /* [n, in], row stride ldx */
    std::ptrdiff_t ldx;
    const T* bias;   /* [out] or null */
    const T* xs;     /* [n, r], row stride ldxs, already scaled; null without a LoRA term */
    std::ptrdiff_t ldxs;
    const T* b;      /* [out, r], row stride ldb */
    std::ptrdiff_t ldb;
    std::ptrdiff_t r;
    T* y;            /* [n, out], row stride ldy */
    std::ptrdiff_t ldy;
    std::ptrdiff_t n;
    std::ptrdiff_t in;
    std::ptrdiff_t out;
    /* Optional packed forms for the outer-product kernel (null: the dot-product kernel):
       xt[k * ldt + b] = x[b, k] and xst[j * ldt + b] = xs[b, j], zero-padded to ldt columns. */
    const T* xt;
    const T* xst;
    std::ptrdiff_t ldt;
};

namespace kernels {
namespace avx512 {
void small_batch_rows(const SmallBatchArgs<float>& args, std::ptrdiff_t begin, std::ptrdiff_t end);
void small_batch_rows(const SmallBatchArgs<double>& args, std::ptrdiff_t begin, std::ptrdiff_t end);
int lanes(float);  /* vector width in elements */
int lanes(double);
}  // namespace avx512
namespace avx2 {
void small_batch_rows(const SmallBatchArgs<float>& args, std::ptrdiff_t begin, std::ptrdiff_t end);
void small_batch_rows(const SmallBatchArgs<double>& args, std::ptrdiff_t begin, std::ptrdiff_t end);
int lanes(float);  /* vector width in elements */
int lanes(double);
}  // namespace avx2
}  // namespace kernels

}  // namespace nplora
