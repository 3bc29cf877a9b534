#include "nplora/kernels.hpp"

#include "nplora/parallel.hpp"

#include <cstdlib>
#include <cstring>

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

template <class T>
bool small_batch_linear(const SmallBatchArgs<T>& args) {
#if defined(NPLORA_HAVE_X86_KERNELS)
    const Isa chosen = isa();
    if (chosen == Isa::None) return false;
    if (args.n <= 0 || args.out <= 0) return true;
    // Whole blocks of 4 weight rows per thread, so each thread streams its own part of W.
    const Index blocks = (args.out + 3) / 4;
    parallel_for(blocks, 16, [&](Index begin, Index end) {
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
