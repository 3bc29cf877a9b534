// Dispatchers for the small-batch kernels (one pass over W: plain, and mixed batches of adapters)
// and the instruction set they run on.
#include "nplora/kernels.hpp"

#include "kernel_dispatch.hpp"
#include "nplora/parallel.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace nplora {
namespace dispatch {
namespace {

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

}  // namespace

Isa isa() {
    static const Isa detected = detect_isa();
    return detected;
}

#if defined(NPLORA_HAVE_X86_KERNELS)
Index lanes_of(Isa chosen, float) {
    return chosen == Isa::Avx512 ? kernels::avx512::lanes(float()) : kernels::avx2::lanes(float());
}
Index lanes_of(Isa chosen, double) {
    return chosen == Isa::Avx512 ? kernels::avx512::lanes(double()) : kernels::avx2::lanes(double());
}
#endif

}  // namespace dispatch

using dispatch::Isa;
using dispatch::isa;

namespace {

// NPLORA_OUTER_MIN_ROWS, if set: the rows up to which the dot-product kernel runs (for tuning).
const Index kOuterMinRowsOverride = [] {
    const char* env = std::getenv("NPLORA_OUTER_MIN_ROWS");
    return env ? static_cast<Index>(std::atoi(env)) : Index(-1);
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

using dispatch::lanes_of;

// Up to this many rows the dot-product kernel wins: the outer-product one's lanes would mostly
// hold padding. With AVX-512 floats (16 lanes) the dot kernel's whole-batch tiles win up to 6
// rows: on Zen 4, relative to NumPy's W @ v timed beside them, 1.3 against 1.75 W @ v times at
// 5-6 rows (at 7-8 rows the outer-product kernel was faster again; in float64 it won from 5 rows);
// on the Xeon, batch 5-6 at 4096x4096 took 1.8-2.0 ms against 3.7-5.5 ms, and 3x7 or 3x8 dot
// tiles did not beat the outer-product kernel at 7-8 rows (x no longer fits L1).
template <class T>
Index outer_product_min_rows(Isa chosen) {
    if (kOuterMinRowsOverride >= 0) return kOuterMinRowsOverride;
    return chosen == Isa::Avx512 && sizeof(T) == 4 ? 6 : 4;
}

// Whether a batch of n rows takes the outer-product kernel (up to four vectors of rows).
template <class T>
bool takes_outer_product(Isa chosen, Index n) {
    return chosen != Isa::None && n > outer_product_min_rows<T>(chosen) && n <= 4 * lanes_of(chosen, T());
}

// Whether a batch of n rows takes the weight-streaming kernels at all. AVX2's 16 registers hold
// no outer-product tile past four vectors of rows, and the dot-product tiles that would take the
// rest ran at half the packed GEMM's rate there (Zen 3, batch 48-64 of 4096 x 4096).
template <class T>
bool takes_small_batch(Isa chosen, Index n) {
    return chosen == Isa::Avx512 || n <= 4 * lanes_of(chosen, T());
}

// The rows of W [0, out) in chunks the threads take as they go (ChunkQueue), so each thread streams
// its own parts of W, each at least ~1 MB: below that, waking a thread costs more than it saves.
// Chunks are whole multiples of 24 rows, so the tiles (6 or 8 rows) never leave single rows behind
// inside a chunk.
constexpr Index kWeightRowAlign = 24;

template <class T>
ChunkQueue weight_row_chunks(Index out, Index in) {
    const Index row_bytes = in * static_cast<Index>(sizeof(T));
    const Index min_rows = row_bytes > 0 ? std::max<Index>(64, (Index(1) << 20) / row_bytes) : 64;
    return ChunkQueue(out, min_rows, 4 * min_rows, kWeightRowAlign, get_num_threads());
}

template <class T>
void over_weight_rows(Index out, Index in, const std::function<void(Index, Index)>& fn) {
    ChunkQueue queue = weight_row_chunks<T>(out, in);
    parallel_chunks(queue, fn);
}

bool next_chunk_of(void* queue, std::ptrdiff_t* begin, std::ptrdiff_t* end) {
    Index b = 0, e = 0;
    if (!static_cast<ChunkQueue*>(queue)->next(b, e)) return false;
    *begin = b;
    *end = e;
    return true;
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
    if (!takes_small_batch<T>(chosen, given.n)) return false;
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
    over_weight_rows<T>(args.out, args.in, [&](Index first, Index last) {
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
    std::vector<Index> task_adapter, task_row, task_row_end;
    Index ldsp = 1;
    for (Index u = 0; u < adapters; ++u) {
        if (row_begin[static_cast<std::size_t>(u)] == row_begin[static_cast<std::size_t>(u + 1)]) continue;
        ldsp = std::max(ldsp, r[u]);
        for (Index j = 0; j < r[u]; j += kMixedShrinkRows) {
            task_adapter.push_back(u);
            task_row.push_back(j);
            task_row_end.push_back(std::min(r[u], j + kMixedShrinkRows));
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
    args.task_row_end = task_row_end.data();
    args.row_begin = row_begin.data();
    args.row_list = row_list.data();
    args.tasks = static_cast<Index>(task_adapter.size());
    args.sp = sp.data();
    args.ldsp = ldsp;
    args.claimed = &claimed;
    args.finished = &finished;

    ChunkQueue queue = weight_row_chunks<T>(base.out, base.in);
    args.next_chunk = &next_chunk_of;
    args.queue = &queue;
    parallel_for(queue.threads(), 1, [&](Index, Index) {
        if (chosen == Isa::Avx512)
            kernels::avx512::mixed_batch_rows(args);
        else
            kernels::avx2::mixed_batch_rows(args);
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

}  // namespace nplora
