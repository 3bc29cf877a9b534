// Dispatchers for the large products: nplora's packed GEMM and the LoRA backward's thin products.
#include "kernel_dispatch.hpp"
#include "nplora/kernels.hpp"
#include "nplora/parallel.hpp"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

namespace nplora {

using dispatch::Isa;
using dispatch::isa;
#if defined(NPLORA_HAVE_X86_KERNELS)
using dispatch::lanes_of;
#endif

template <class T>
bool lora_linear_grads(const T* g, Index ldg, const T* x, Index ldx, const T* b, const T* p, T s,
                       Index n, Index out, Index in, Index r, T* gp, T* db, T* da) {
#if defined(NPLORA_HAVE_X86_KERNELS)
    const Isa chosen = isa();
    if (chosen == Isa::None) return false;
    const Index lanes = lanes_of(chosen, T());
    const Index r_pad = (r + lanes - 1) / lanes * lanes;
    if (r < 1 || r_pad > 2 * lanes) return false;
    if (n <= 0 || out <= 0 || in <= 0) {
        std::fill(gp, gp + std::max<Index>(n, 0) * r, T(0));
        return true;
    }
    const auto grad_b = [chosen](const LoraGradArgs<T>& a, Index k_begin, Index k_end, T* gb) {
        if (chosen == Isa::Avx512)
            kernels::avx512::lora_grad_b(a, k_begin, k_end, gb);
        else
            kernels::avx2::lora_grad_b(a, k_begin, k_end, gb);
    };
    const auto grad_a = [chosen](const LoraGradArgs<T>& a, Index k_begin, Index k_end) {
        if (chosen == Isa::Avx512)
            kernels::avx512::lora_grad_a(a, k_begin, k_end);
        else
            kernels::avx2::lora_grad_a(a, k_begin, k_end);
    };
    const auto padded = [](const T* src, Index rows, Index cols, Index ld, T scale) {
        std::vector<T> dst(static_cast<std::size_t>(rows * ld), T(0));
        for (Index i = 0; i < rows; ++i)
            for (Index j = 0; j < cols; ++j) dst[static_cast<std::size_t>(i * ld + j)] = scale * src[i * cols + j];
        return dst;
    };
    // The kernels want whole vectors per row: B and dB are copied only when r is not.
    const bool exact = r == r_pad;
    std::vector<T> b_copy, db_copy;
    if (!exact) {
        b_copy = padded(b, out, r, r_pad, T(1));
        db_copy = padded(db, out, r, r_pad, T(1));
    }
    const std::vector<T> sp = padded(p, n, r, r_pad, s);
    LoraGradArgs<T> args{};
    args.g = g;
    args.ldg = ldg;
    args.b = exact ? b : b_copy.data();
    args.sp = sp.data();
    args.db = exact ? db : db_copy.data();
    args.x = x;
    args.ldx = ldx;
    args.n = n;
    args.r = r;
    args.r_pad = r_pad;
    args.in = in;

    // G B and G^T (s P): out in a fixed number of parts, each with its own part of G B to sum, which
    // the threads take as they go (ChunkQueue: a slower core takes fewer). Summed in part order, so
    // the result does not depend on the thread count.
    const Index parts = std::max<Index>(1, std::min<Index>(8, out / 64));
    std::vector<T> partial(static_cast<std::size_t>(parts * n * r_pad), T(0));
    parallel_chunks(parts, 1, 1, 1, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t)
            grad_b(args, out * t / parts, out * (t + 1) / parts, partial.data() + t * n * r_pad);
    });
    for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < r; ++j) {
            T sum = T(0);
            for (Index t = 0; t < parts; ++t) sum += partial[static_cast<std::size_t>((t * n + i) * r_pad + j)];
            gp[i * r + j] = s * sum;
        }
    if (!exact)
        for (Index k = 0; k < out; ++k)
            for (Index j = 0; j < r; ++j) db[k * r + j] = db_copy[static_cast<std::size_t>(k * r_pad + j)];

    // (s G B)^T X: in split between the threads in whole blocks of the kernel's width.
    const Index block_rows = chosen == Isa::Avx512 ? kernels::avx512::grad_a_rows(T()) : kernels::avx2::grad_a_rows(T());
    args.ldgbs = (r + block_rows - 1) / block_rows * block_rows;
    const std::vector<T> gbs = padded(gp, n, r, args.ldgbs, T(1));
    args.gbs = gbs.data();
    args.da = da;
    const Index width = 2 * lanes;
    const Index blocks = (in + width - 1) / width;
    // ~2 MFLOP per part at least: less does not pay for waking a thread.
    const Index grain = std::max<Index>(1, Index(1 << 20) / std::max<Index>(1, n * args.ldgbs * width));
    parallel_chunks(blocks, grain, 4 * grain, 1, [&](Index begin, Index end) {
        grad_a(args, begin * width, std::min(end * width, in));
    });
    return true;
#else
    (void)g, (void)ldg, (void)x, (void)ldx, (void)b, (void)p, (void)s, (void)n, (void)out, (void)in;
    (void)r, (void)gp, (void)db, (void)da;
    return false;
#endif
}

template bool lora_linear_grads<float>(const float*, Index, const float*, Index, const float*,
                                       const float*, float, Index, Index, Index, Index, float*,
                                       float*, float*);
template bool lora_linear_grads<double>(const double*, Index, const double*, Index, const double*,
                                        const double*, double, Index, Index, Index, Index, double*,
                                        double*, double*);

#if defined(NPLORA_HAVE_X86_KERNELS)
namespace {

// 64-byte aligned scratch. Each thread keeps its last buffer up to kKeptScratchBytes, so repeated
// products do not pay fresh page faults on every call; larger ones are returned after use. 32 MB
// covers a packed batch of 512 float64 rows of 4096 (16 MB and a LoRA term's few columns: at a
// 16 MB limit it was faulted in afresh each call, ~4 ms of a 170 ms forward).
constexpr std::size_t kKeptScratchBytes = std::size_t(32) << 20;

struct FreeAligned {
    void operator()(void* p) const { std::free(p); }
};

class Scratch {
public:
    template <class T>
    T* get(std::size_t count) {
        const std::size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
        if (bytes > capacity_) {
            buffer_.reset();
            capacity_ = 0;
            void* raw = std::aligned_alloc(64, bytes);
            if (!raw) throw std::bad_alloc();
            buffer_.reset(raw);
            capacity_ = bytes;
        }
        return static_cast<T*>(buffer_.get());
    }
    void release_if_large() {
        if (capacity_ > kKeptScratchBytes) {
            buffer_.reset();
            capacity_ = 0;
        }
    }

private:
    std::unique_ptr<void, FreeAligned> buffer_;
    std::size_t capacity_ = 0;
};

thread_local Scratch tls_packed_x;
thread_local Scratch tls_w_block;

template <class T>
GemmShape shape_for(Isa chosen) {
    return chosen == Isa::Avx512 ? kernels::avx512::gemm_shape(T()) : kernels::avx2::gemm_shape(T());
}

}  // namespace
#endif

template <class T>
bool packed_gemm(const GemmArgs<T>& a) {
#if defined(NPLORA_HAVE_X86_KERNELS)
    const Isa chosen = isa();
    if (chosen == Isa::None) return false;
    if (a.m <= 0 || a.n <= 0) return true;
    const Index depth = a.k + (a.x2 ? a.k2 : 0);
    if (depth <= 0) return false;  // nothing to multiply: the caller scales C
    const GemmShape shape = shape_for<T>(chosen);
    if (!a.x2 && !a.bias && a.n < shape.cols && a.m >= 4 * shape.cols) {
        // A tall, skinny C (e.g. G B, r columns): as it is, most lanes would hold padding and all
        // of X would be packed for a single use. C^T = Wop^T X^T instead streams X through the
        // per-block packing with every lane busy; then C = alpha C^T^T + beta C.
        std::vector<T> ct(static_cast<std::size_t>(a.n * a.m));
        GemmArgs<T> t{};
        t.x = a.w;
        t.ldx = a.ldw;
        t.x_trans = !a.w_trans;
        t.w = a.x;
        t.ldw = a.ldx;
        t.w_trans = !a.x_trans;
        t.k = a.k;
        t.alpha = T(1);
        t.beta = T(0);
        t.c = ct.data();
        t.ldc = a.m;
        t.m = a.n;
        t.n = a.m;
        packed_gemm(t);
        for (Index i = 0; i < a.m; ++i) {
            T* row = a.c + i * a.ldc;
            for (Index j = 0; j < a.n; ++j) {
                const T value = a.alpha * ct[static_cast<std::size_t>(j * a.m + i)];
                row[j] = a.beta == T(0) ? value : value + a.beta * row[j];
            }
        }
        return true;
    }
    const Index row_panels = (a.m + shape.rows - 1) / shape.rows;
    const Index col_tiles = (a.n + shape.cols - 1) / shape.cols;

    // X once, shared by every thread: ~64 KB of it per part is worth a thread.
    T* packed = tls_packed_x.get<T>(static_cast<std::size_t>(row_panels * shape.rows * depth));
    const Index panel_elems = shape.rows * depth;
    parallel_for(row_panels, std::max<Index>(1, (Index(1) << 14) / panel_elems), [&](Index b, Index e) {
        if (chosen == Isa::Avx512)
            kernels::avx512::gemm_pack_x(a, b, e, packed);
        else
            kernels::avx2::gemm_pack_x(a, b, e, packed);
    });

    // A product a few k deep (merge, unmerge and swap: C += B A at rank r) is a pass over C, r
    // multiply-adds per element read and written: C's speed is the memory's. In blocks of
    // kGemmBlockCols columns, C would be walked down strips a few hundred bytes wide, one row
    // 16 KB after the last, where no hardware prefetcher follows. A W block as wide as C's rows (up to
    // kWideBlockBytes, in L2) walks C's rows whole, in row chunks across the threads: the merge
    // at 4096 x 4096, r = 16 went from 4.8 to 3.3 ms on Zen 5 (2.5-3.3 ms with gemm_part's C
    // prefetch for this case; NumPy's in-place w *= 1 takes 2.0-2.3 ms there).
    constexpr Index kWideDepth = 64;
    constexpr Index kWideBlockBytes = Index(256) << 10;
    const Index depth_first = std::min(a.k, shape.depth);
    const Index depth_second = a.x2 ? std::min(a.k2, shape.depth) : 0;
    const int threads = get_num_threads();
    // (With too few of C's rows to share, the column split below keeps every thread busy.)
    const bool wide = depth <= kWideDepth && row_panels >= 2 * threads;
    Index block_cols = shape.block_cols;
    if (wide) {
        const Index fit = kWideBlockBytes / (depth * static_cast<Index>(sizeof(T))) / shape.cols * shape.cols;
        block_cols = std::max(block_cols, std::min(col_tiles * shape.cols, fit));
    }
    // (gemm_part knows this case by a block wider than kGemmBlockCols, and prefetches C ahead.)
    // Otherwise split C by columns (each thread streams its own part of W) when there are enough
    // of them, else by rows. A part gets at least ~4 MFLOP: less does not pay for waking a thread.
    const auto compute = [&](Index row_b, Index row_e, Index col_b, Index col_e) {
        T* w_block = tls_w_block.get<T>(static_cast<std::size_t>((depth_first + depth_second) * block_cols));
        if (chosen == Isa::Avx512)
            kernels::avx512::gemm_compute(a, packed, row_b, row_e, col_b, col_e, block_cols, w_block);
        else
            kernels::avx2::gemm_compute(a, packed, row_b, row_e, col_b, col_e, block_cols, w_block);
    };
    constexpr double kMinFlopsPerPart = 4e6;
    if (wide) {
        // Row chunks, each packing W's blocks for itself: at least 8 rows of C per row of W packed.
        const double panel_flops = 2.0 * shape.rows * static_cast<double>(a.n) * depth;
        const Index grain = std::max<Index>(1, static_cast<Index>(kMinFlopsPerPart / panel_flops));
        const Index min_panels = std::max<Index>(grain, (8 * depth + shape.rows - 1) / shape.rows);
        parallel_chunks(row_panels, min_panels, row_panels, 1,
                        [&](Index b, Index e) { compute(b, e, 0, a.n); });
    } else if (col_tiles >= 2 * threads || col_tiles >= row_panels) {
        // Columns in chunks the threads take as they go, not in halves: on a shared machine one
        // core often ran 10-15% slower than the other for seconds at a time (x W^T at b=512: 80
        // against 91 ms per thread), and an even split waits for the slower one.
        const double tile_flops = 2.0 * static_cast<double>(a.m) * shape.cols * depth;
        const Index grain = std::max<Index>(1, static_cast<Index>(kMinFlopsPerPart / tile_flops));
        const Index min_tiles = std::max<Index>(grain, 2);
        const Index max_tiles = std::max<Index>(grain, 2 * shape.block_cols / shape.cols);
        parallel_chunks(col_tiles, min_tiles, max_tiles, 1, [&](Index b, Index e) {
            compute(0, row_panels, b * shape.cols, std::min(e * shape.cols, a.n));
        });
    } else {
        const double panel_flops = 2.0 * shape.rows * static_cast<double>(a.n) * depth;
        const Index grain = std::max<Index>(1, static_cast<Index>(kMinFlopsPerPart / panel_flops));
        parallel_for(row_panels, grain, [&](Index b, Index e) { compute(b, e, 0, a.n); });
    }
    tls_packed_x.release_if_large();
    return true;
#else
    (void)a;
    return false;
#endif
}

template bool packed_gemm<float>(const GemmArgs<float>&);
template bool packed_gemm<double>(const GemmArgs<double>&);

}  // namespace nplora
