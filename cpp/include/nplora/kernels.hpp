// Hand-written SIMD kernels with run-time dispatch (AVX-512, AVX2+FMA), for the shapes where a
// general BLAS product is far from the machine's limit.
#pragma once

#include "nplora/kernel_args.h"
#include "nplora/types.hpp"

#include <cstddef>

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

// A mixed batch of n rows (small_batch_linear's base args without a LoRA term), row i running
// adapter adapter_of_row[i] of `adapters` (A [r, in], B [out, r] contiguous, scaling), or the base
// alone for -1: the adapters' reads overlap the base product's FMAs (see kernels_mixed.inc).
// Returns false (doing nothing) where the outer-product kernel does not take n rows.
template <class T>
bool mixed_small_batch_linear(const SmallBatchArgs<T>& base, const T* const* a, const T* const* b,
                              const Index* r, const T* scaling, Index adapters,
                              const Index* adapter_of_row);

// The LoRA backward's thin products on kernels that read G (n x out, row stride ldg) and X (n x in,
// row stride ldx) once each, with B [out, r], P = x A^T [n, r], gp [n, r], db [out, r], da [r, in]
// contiguous:  gp = s G B;  db += s G^T P;  da += gp^T X.
// Returns false (doing nothing) when no SIMD kernel runs here or r is wider than 2 vectors (where
// the packed GEMM's three products were measured faster).
template <class T>
bool lora_linear_grads(const T* g, Index ldg, const T* x, Index ldx, const T* b, const T* p, T s,
                       Index n, Index out, Index in, Index r, T* gp, T* db, T* da);

// Batches up to this many rows take small_batch_linear; larger ones a BLAS-class product.
constexpr Index kSmallBatchMaxRows = 64;

// The rows of x (n x cols, row stride ld) laid out for the outer-product kernel: data()[k * ld() + b]
// = x[b, k], zero-padded to whole vectors, or two k per lane pair for batches of at most half a
// vector (SmallBatchArgs::xt / ldt). Packing once lets several small-batch products over the same
// rows (a layer's A and its W) share it; it runs on every thread. Empty (data() == nullptr) when n rows take the dot-product kernel or no SIMD kernel runs
// on this CPU. The buffer goes back to a per-thread spare on destruction, so repeated calls do not
// pay fresh page faults.
template <class T>
class SmallBatchPack {
public:
    SmallBatchPack(const T* x, Index ld, Index n, Index cols);
    ~SmallBatchPack();
    SmallBatchPack(const SmallBatchPack&) = delete;
    SmallBatchPack& operator=(const SmallBatchPack&) = delete;

    const T* data() const { return data_; }
    Index ld() const { return ld_; }

private:
    void* buffer_ = nullptr;
    std::size_t bytes_ = 0;
    T* data_ = nullptr;
    Index ld_ = 0;
};

}  // namespace nplora
