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
       xt[k * ldt + b] = x[b, k] and xst[j * ldt + b] = xs[b, j], zero-padded to ldt columns; for
       batches of at most half a vector (2 n <= lanes), two k per lane pair instead:
       xt[(k / 2) * ldt + 2 b + k % 2] = x[b, k] (and so for xst), where for an odd k the last
       row's odd lanes are left unwritten (the kernel reads only its even lanes). */
    const T* xt;
    const T* xst;
    std::ptrdiff_t ldt;
};

/* C = alpha (X Wop + X2 W2op) + beta C, plus bias[j] on every row when bias is non-null, for a
   row-major C [m, n] (row stride ldc). X is [m, k]: x[i * ldx + p], or x[p * ldx + i] with x_trans.
   Wop is [k, n]: w[p * ldw + j], or w[j * ldw + p] with w_trans. The second term is optional (x2
   null: none) and has depth k2. With beta == 0, C is written without being read. */
template <class T>
struct GemmArgs {
    const T* x;
    std::ptrdiff_t ldx;
    int x_trans;
    const T* w;
    std::ptrdiff_t ldw;
    int w_trans;
    std::ptrdiff_t k;
    const T* x2;
    std::ptrdiff_t ldx2;
    int x2_trans;
    const T* w2;
    std::ptrdiff_t ldw2;
    int w2_trans;
    std::ptrdiff_t k2;
    const T* bias;
    T alpha;
    T beta;
    T* c;
    std::ptrdiff_t ldc;
    std::ptrdiff_t m;
    std::ptrdiff_t n;
};

/* The LoRA backward's thin products, which stream G [n, out] or X [n, in] once (r small). With
   r_pad = r rounded up to whole vectors and every [*, r_pad] matrix contiguous and zero-padded:
   lora_grad_b, for k in [k_begin, k_end):  gb[i, :] += G[i, k] b[k, :] for every row i < n, and
                                            db[k, :] += sum_i G[i, k] sp[i, :];
   lora_grad_a, for k in [k_begin, k_end):  da[j, k] += sum_i gbs[i, j] X[i, k] for j < r, where
                                            gbs is [n, ldgbs] (ldgbs a multiple of grad_a_rows,
                                            zero beyond r) and da is [r, in] contiguous. */
template <class T>
struct LoraGradArgs {
    const T* g;          /* [n, out], row stride ldg */
    std::ptrdiff_t ldg;
    const T* b;          /* [out, r_pad] */
    const T* sp;         /* [n, r_pad]: s x A^T */
    T* db;               /* [out, r_pad] */
    const T* x;          /* [n, in], row stride ldx */
    std::ptrdiff_t ldx;
    const T* gbs;        /* [n, ldgbs]: s G B */
    std::ptrdiff_t ldgbs;
    T* da;               /* [r, in] */
    std::ptrdiff_t n;
    std::ptrdiff_t r;
    std::ptrdiff_t r_pad;
    std::ptrdiff_t in;
};

/* A mixed batch (row i runs adapter adapter_of_row[i], or the base alone for -1) on the
   outer-product kernel: base is the small-batch product for every row (xt packed, no LoRA term).
   Adapter u has A [r[u], in] and B [out, r[u]], both contiguous, and scaling[u].
   Task t computes sp[i, j] = scaling[u] x_i . A_u[j, :] for j in [task_row[t], task_row_end[t])
   (at most kMixedShrinkRows rows) and every row i of u = task_adapter[t] (row_list[row_begin[u] ..
   row_begin[u + 1])); every output o then gets y[i, o] += B_u[o, :] . sp[i, :] after the base
   product of its chunk. Tasks are claimed through *claimed and counted done through *finished
   (GCC atomic builtins: both start at 0). */
constexpr std::ptrdiff_t kMixedShrinkRows = 8;

template <class T>
struct MixedBatchArgs {
    SmallBatchArgs<T> base;
    const T* const* a;
    const T* const* b;
    const std::ptrdiff_t* r;
    const T* scaling;
    const std::ptrdiff_t* adapter_of_row;  /* [n] */
    const std::ptrdiff_t* task_adapter;    /* [tasks] */
    const std::ptrdiff_t* task_row;        /* [tasks] */
    const std::ptrdiff_t* task_row_end;    /* [tasks] */
    const std::ptrdiff_t* row_begin;       /* [adapters + 1] */
    const std::ptrdiff_t* row_list;
    std::ptrdiff_t tasks;
    T* sp;                                 /* [n, ldsp] */
    std::ptrdiff_t ldsp;
    std::ptrdiff_t* claimed;
    std::ptrdiff_t* finished;
    /* Hands the calling thread its next chunk of output rows [*begin, *end) (false: none left),
       so a slower thread takes fewer of them. */
    bool (*next_chunk)(void* queue, std::ptrdiff_t* begin, std::ptrdiff_t* end);
    void* queue;
};

/* The packed GEMM's blocking: tiles of `rows` x `cols` of C, k blocks of `depth`, W blocks of
   `block_cols` columns. X is packed as ceil(m / rows) panels of rows x (k + k2). */
struct GemmShape {
    int rows;
    int cols;
    std::ptrdiff_t depth;
    std::ptrdiff_t block_cols;
};

/* What each instruction set's kernel file defines, declared once for every ISA namespace. */
#define NPLORA_KERNEL_ENTRY_POINTS(T)                                                              \
    void small_batch_rows(const SmallBatchArgs<T>& args, std::ptrdiff_t begin, std::ptrdiff_t end); \
    /* dst[k * ldt + b] = x[b * ld + k] for k in [k_begin, k_end), b < n; zero for n <= b < ldt */ \
    void pack_rows_transposed(const T* x, std::ptrdiff_t ld, std::ptrdiff_t n,                     \
                              std::ptrdiff_t k_begin, std::ptrdiff_t k_end, std::ptrdiff_t ldt,    \
                              T* dst);                                                             \
    /* LoraGradArgs; r_pad one or two vectors. gb is [n, r_pad]. */                                \
    void lora_grad_b(const LoraGradArgs<T>& a, std::ptrdiff_t k_begin, std::ptrdiff_t k_end, T* gb); \
    void lora_grad_a(const LoraGradArgs<T>& a, std::ptrdiff_t k_begin, std::ptrdiff_t k_end);       \
    int grad_a_rows(T); /* the j block lora_grad_a works in (ldgbs is a multiple of it) */        \
    /* The chunks of a mixed batch's output rows that a.next_chunk hands this thread; every call    \
       together covers all of them. */                                                             \
    void mixed_batch_rows(const MixedBatchArgs<T>& a);                                             \
    int lanes(T); /* vector width in elements */                                                  \
    GemmShape gemm_shape(T);                                                                       \
    void gemm_pack_x(const GemmArgs<T>& a, std::ptrdiff_t panel_begin, std::ptrdiff_t panel_end,    \
                     T* packed);                                                                   \
    /* C's rows [row_panel_begin, row_panel_end) * rows by columns [col_begin, col_end), W packed    \
       in blocks of block_cols columns (a multiple of cols); w_block holds                         \
       (min(k, depth) + min(k2, depth)) * block_cols elements of scratch. */                       \
    void gemm_compute(const GemmArgs<T>& a, const T* packed_x, std::ptrdiff_t row_panel_begin,      \
                      std::ptrdiff_t row_panel_end, std::ptrdiff_t col_begin, std::ptrdiff_t col_end, \
                      std::ptrdiff_t block_cols, T* w_block);

namespace kernels {
namespace avx512 {
NPLORA_KERNEL_ENTRY_POINTS(float)
NPLORA_KERNEL_ENTRY_POINTS(double)
}  // namespace avx512
namespace avx2 {
NPLORA_KERNEL_ENTRY_POINTS(float)
NPLORA_KERNEL_ENTRY_POINTS(double)
}  // namespace avx2
}  // namespace kernels

#undef NPLORA_KERNEL_ENTRY_POINTS

}  // namespace nplora
