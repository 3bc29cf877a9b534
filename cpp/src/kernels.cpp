#include "nplora/kernels.hpp"

#include "nplora/parallel.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
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

// x (n x cols, row stride ld) transposed into packed[k * ldt + b], zero-padded to ldt columns.
template <class T>
void pack_transposed(const T* x, Index ld, Index n, Index cols, Index ldt, std::vector<T>& packed) {
    packed.assign(static_cast<std::size_t>(cols * ldt), T(0));
    for (Index b = 0; b < n; ++b)
        for (Index k = 0; k < cols; ++k) packed[static_cast<std::size_t>(k * ldt + b)] = x[b * ld + k];
}

template <class T>
bool small_batch_linear(const SmallBatchArgs<T>& given) {
#if defined(NPLORA_HAVE_X86_KERNELS)
    const Isa chosen = isa();
    if (chosen == Isa::None) return false;
    if (given.n <= 0 || given.out <= 0) return true;
    // Batches past a few rows use the outer-product kernel (up to four vectors of rows).
    SmallBatchArgs<T> args = given;
    const Index lanes = chosen == Isa::Avx512 ? kernels::avx512::lanes(T()) : kernels::avx2::lanes(T());
    std::vector<T> xt, xst;
    if (args.n > kOuterProductMinRows && args.n <= 4 * lanes && !args.xt) {
        args.ldt = (args.n + lanes - 1) / lanes * lanes;
        pack_transposed(args.x, args.ldx, args.n, args.in, args.ldt, xt);
        args.xt = xt.data();
        if (args.xs) {
            pack_transposed(args.xs, args.ldxs, args.n, args.r, args.ldt, xst);
            args.xst = xst.data();
        }
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
    (void)args;
    return false;
#endif
}

template bool small_batch_linear<float>(const SmallBatchArgs<float>&);
template bool small_batch_linear<double>(const SmallBatchArgs<double>&);

}  // namespace nplora
