#include "nplora/kernels.hpp"

#include "nplora/parallel.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace nplora {
namespace {

enum class Isa { None, Avx2, Avx512 };

Isa detect_isa() {
#if defined(NPLORA_HAVE_X86_KERNELS)
    __builtin_cpu_init();
    Isa best = Isa::None;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
        best = Isa::Avx512;
    // NPLORA_ISA lowers the choice (for testing every path on one machine), never raises it.
    if (const char* wanted = std::getenv("NPLORA_ISA")) {
        if (std::strcmp(wanted, "none") == 0) return Isa::None;
        if (std::strcmp(wanted, "avx2") == 0 && best == Isa::Avx512) return Isa::Avx2;
    }
    return best;
#else
    return Isa::None;
#endif
}

Isa isa() {
    static const Isa detected = detect_isa();
    return detected;
}

// Up to this many rows the dot-product kernel wins (the lanes of the outer-product one would
// mostly hold padding). NPLORA_OUTER_MIN_ROWS overrides it for tuning.
const Index kOuterProductMinRows = [] {
    const char* env = std::getenv("NPLORA_OUTER_MIN_ROWS");
    return env ? static_cast<Index>(std::atoi(env)) : Index(4);
}();

}  // namespace

const char* kernel_isa() {
    switch (isa()) {
        case Isa::Avx512:
            return "avx512";
        case Isa::Avx2:
            return "avx2";
        default:
            return "none";
    }
}

#if defined(NPLORA_HAVE_X86_KERNELS)
namespace {

Index lanes_of(Isa chosen, float) {
    return chosen == Isa::Avx512 ? kernels::avx512::lanes(float()) : kernels::avx2::lanes(float());
}
Index lanes_of(Isa chosen, double) {
    return chosen == Isa::Avx512 ? kernels::avx512::lanes(double()) : kernels::avx2::lanes(double());
}

// Whether a batch of n rows takes the outer-product kernel (up to four vectors of rows).
template <class T>
bool takes_outer_product(Isa chosen, Index n) {
    return chosen != Isa::None && n > kOuterProductMinRows && n <= 4 * lanes_of(chosen, T());
}

// One spare pack buffer per thread: a SmallBatchPack takes it when it is large enough and gives
// its own back when the slot is empty.
struct SpareBuffer {
    void* buffer = nullptr;
    std::size_t bytes = 0;
    ~SpareBuffer() { std::free(buffer); }
};
thread_local SpareBuffer tls_spare_pack;

}  // namespace
#endif

template <class T>
SmallBatchPack<T>::SmallBatchPack(const T* x, Index ld, Index n, Index cols) {
#if defined(NPLORA_HAVE_X86_KERNELS)
    const Isa chosen = isa();
    if (!takes_outer_product<T>(chosen, n) || cols <= 0) return;
    const Index lanes = lanes_of(chosen, T());
    ld_ = (n + lanes - 1) / lanes * lanes;
    const std::size_t wanted = (static_cast<std::size_t>(cols * ld_) * sizeof(T) + 63) / 64 * 64;
    if (tls_spare_pack.buffer && tls_spare_pack.bytes >= wanted) {
        buffer_ = tls_spare_pack.buffer;
        bytes_ = tls_spare_pack.bytes;
        tls_spare_pack = {};
    } else {
        buffer_ = std::aligned_alloc(64, wanted);
        if (!buffer_) throw std::bad_alloc();
        bytes_ = wanted;
    }
    data_ = static_cast<T*>(buffer_);
    // ~64 KB of packed x per part: below that a second thread costs more than it saves.
    const Index grain = std::max<Index>(8, (Index(1) << 16) / (ld_ * static_cast<Index>(sizeof(T))));
    parallel_for(cols, grain, [&](Index begin, Index end) {
        if (chosen == Isa::Avx512)
            kernels::avx512::pack_rows_transposed(x, ld, n, begin, end, ld_, data_);
        else
            kernels::avx2::pack_rows_transposed(x, ld, n, begin, end, ld_, data_);
    });
#else
    (void)x, (void)ld, (void)n, (void)cols;
#endif
}

template <class T>
SmallBatchPack<T>::~SmallBatchPack() {
#if defined(NPLORA_HAVE_X86_KERNELS)
    if (!buffer_) return;
    if (!tls_spare_pack.buffer || tls_spare_pack.bytes < bytes_) {
        std::free(tls_spare_pack.buffer);
        tls_spare_pack.buffer = buffer_;
        tls_spare_pack.bytes = bytes_;
    } else {
        std::free(buffer_);
    }
#endif
}

template class SmallBatchPack<float>;
template class SmallBatchPack<double>;

template <class T>
bool small_batch_linear(const SmallBatchArgs<T>& given) {
#if defined(NPLORA_HAVE_X86_KERNELS)
    const Isa chosen = isa();
    if (chosen == Isa::None) return false;
    if (given.n <= 0 || given.out <= 0) return true;
    // Batches past a few rows use the outer-product kernel, on x packed here unless the caller
    // packed it already (SmallBatchPack).
    SmallBatchArgs<T> args = given;
    std::unique_ptr<SmallBatchPack<T>> own_x, own_xs;
    if (!args.xt && takes_outer_product<T>(chosen, args.n)) {
        own_x = std::make_unique<SmallBatchPack<T>>(args.x, args.ldx, args.n, args.in);
        args.xt = own_x->data();
        args.ldt = own_x->ld();
    }
    if (args.xt && args.xs && !args.xst) {
        own_xs = std::make_unique<SmallBatchPack<T>>(args.xs, args.ldxs, args.n, args.r);
        args.xst = own_xs->data();
    }
    // Whole blocks of 4 weight rows per thread, so each thread streams its own part of W.
    const Index blocks = (args.out + 3) / 4;
    // Each thread gets at least ~1 MB of W: below that, waking a thread costs more than it saves.
    const Index block_bytes = 4 * args.in * static_cast<Index>(sizeof(T));
    const Index grain = block_bytes > 0 ? std::max<Index>(16, (Index(1) << 20) / block_bytes) : 16;
    parallel_for(blocks, grain, [&](Index begin, Index end) {
        const Index first = begin * 4;
        const Index last = end * 4 < args.out ? end * 4 : args.out;
        if (chosen == Isa::Avx512)
            kernels::avx512::small_batch_rows(args, first, last);
        else
            kernels::avx2::small_batch_rows(args, first, last);
    });
    return true;
#else
    (void)given;
    return false;
#endif
}

template bool small_batch_linear<float>(const SmallBatchArgs<float>&);
template bool small_batch_linear<double>(const SmallBatchArgs<double>&);

template <class T>
bool mixed_small_batch_linear(const SmallBatchArgs<T>& base, const T* const* a, const T* const* b,
                              const Index* r, const T* scaling, Index adapters,
                              const Index* adapter_of_row) {
#if defined(NPLORA_HAVE_X86_KERNELS)
    const Isa chosen = isa();
    const Index n = base.n;
    if (!takes_outer_product<T>(chosen, n) || base.xs || base.out <= 0 || base.in <= 0) return false;
    const SmallBatchPack<T> packed(base.x, base.ldx, n, base.in);
    MixedBatchArgs<T> args{};
    args.base = base;
    args.base.xt = packed.data();
    args.base.ldt = packed.ld();

    // Rows by adapter (each adapter's A is read once for all its rows), then one task per row of
    // A of every adapter in use.
    std::vector<Index> row_begin(static_cast<std::size_t>(adapters + 1), 0), row_list;
    for (Index i = 0; i < n; ++i)
        if (adapter_of_row[i] >= 0) ++row_begin[static_cast<std::size_t>(adapter_of_row[i] + 1)];
    for (Index u = 0; u < adapters; ++u) row_begin[static_cast<std::size_t>(u + 1)] += row_begin[static_cast<std::size_t>(u)];
    row_list.resize(static_cast<std::size_t>(row_begin.back()));
    std::vector<Index> fill(row_begin.begin(), row_begin.end() - 1);
    for (Index i = 0; i < n; ++i)
        if (adapter_of_row[i] >= 0) row_list[static_cast<std::size_t>(fill[static_cast<std::size_t>(adapter_of_row[i])]++)] = i;
    std::vector<Index> task_adapter, task_row;
    Index ldsp = 1;
    for (Index u = 0; u < adapters; ++u) {
        if (row_begin[static_cast<std::size_t>(u)] == row_begin[static_cast<std::size_t>(u + 1)]) continue;
        ldsp = std::max(ldsp, r[u]);
        for (Index j = 0; j < r[u]; ++j) {
            task_adapter.push_back(u);
            task_row.push_back(j);
        }
    }
    std::vector<T> sp(static_cast<std::size_t>(n * ldsp), T(0));
    Index claimed = 0, finished = 0;
    args.a = a;
    args.b = b;
    args.r = r;
    args.scaling = scaling;
    args.adapter_of_row = adapter_of_row;
    args.task_adapter = task_adapter.data();
    args.task_row = task_row.data();
    args.row_begin = row_begin.data();
    args.row_list = row_list.data();
    args.tasks = static_cast<Index>(task_adapter.size());
    // x A^T done within about the first third of each thread's tiles (of ~6 rows of W each).
    const Index tiles = std::max<Index>(1, base.out / 6);
    args.tasks_per_tile = std::max<Index>(1, (3 * args.tasks * get_num_threads() + tiles - 1) / tiles);
    args.sp = sp.data();
    args.ldsp = ldsp;
    args.claimed = &claimed;
    args.finished = &finished;

    // As small_batch_linear: whole blocks of 4 weight rows, at least ~1 MB of W per thread.
    const Index blocks = (base.out + 3) / 4;
    const Index block_bytes = 4 * base.in * static_cast<Index>(sizeof(T));
    const Index grain = std::max<Index>(16, (Index(1) << 20) / block_bytes);
    parallel_for(blocks, grain, [&](Index begin, Index end) {
        const Index first = begin * 4;
        const Index last = std::min(end * 4, base.out);
        if (chosen == Isa::Avx512)
            kernels::avx512::mixed_batch_rows(args, first, last);
        else
            kernels::avx2::mixed_batch_rows(args, first, last);
    });
    return true;
#else
    (void)base, (void)a, (void)b, (void)r, (void)scaling, (void)adapters, (void)adapter_of_row;
    return false;
#endif
}

template bool mixed_small_batch_linear<float>(const SmallBatchArgs<float>&, const float* const*,
                                              const float* const*, const Index*, const float*,
                                              Index, const Index*);
template bool mixed_small_batch_linear<double>(const SmallBatchArgs<double>&, const double* const*,
                                               const double* const*, const Index*, const double*,
                                               Index, const Index*);

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

    // G B and G^T (s P): out split between the threads, each with its own part of G B to sum.
    const int parts = static_cast<int>(std::max<Index>(1, std::min<Index>(get_num_threads(), out / 64)));
    std::vector<T> partial(static_cast<std::size_t>(parts * n * r_pad), T(0));
    parallel_for(parts, 1, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t)
            grad_b(args, out * t / parts, out * (t + 1) / parts, partial.data() + t * n * r_pad);
    });
    for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < r; ++j) {
            T sum = T(0);
            for (int t = 0; t < parts; ++t) sum += partial[static_cast<std::size_t>((t * n + i) * r_pad + j)];
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
    parallel_for(blocks, grain, [&](Index begin, Index end) {
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
// products do not pay fresh page faults on every call; larger ones are returned after use.
constexpr std::size_t kKeptScratchBytes = std::size_t(16) << 20;

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

    // Split C by columns (each thread streams its own part of W) when there are enough of them,
    // else by rows. A part gets at least ~4 MFLOP: less does not pay for waking a thread.
    const auto compute = [&](Index row_b, Index row_e, Index col_b, Index col_e) {
        T* w_block = tls_w_block.get<T>(static_cast<std::size_t>(shape.depth * shape.block_cols));
        if (chosen == Isa::Avx512)
            kernels::avx512::gemm_compute(a, packed, row_b, row_e, col_b, col_e, w_block);
        else
            kernels::avx2::gemm_compute(a, packed, row_b, row_e, col_b, col_e, w_block);
    };
    constexpr double kMinFlopsPerPart = 4e6;
    const int threads = get_num_threads();
    if (col_tiles >= 2 * threads || col_tiles >= row_panels) {
        const double tile_flops = 2.0 * static_cast<double>(a.m) * shape.cols * depth;
        const Index grain = std::max<Index>(1, static_cast<Index>(kMinFlopsPerPart / tile_flops));
        parallel_for(col_tiles, grain, [&](Index b, Index e) {
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
