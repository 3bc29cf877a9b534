#include "nplora/lora_options.hpp"

#include "nplora/random.hpp"

#include <cmath>
#include <cstdio>
#include <string>

namespace nplora {

const char* const kReadOnlyMessage =
    "weight is read-only (memory-mapped or a read-only array): merging writes into it, so give "
    "the layer a writable copy (weight.copy())";

void validate(const LoraOptions& options) {
    if (options.r < 1)
        throw std::invalid_argument("r must be >= 1, got " + std::to_string(options.r));
    if (!std::isfinite(options.lora_alpha))
        throw std::invalid_argument("lora_alpha must be finite, got " +
                                    std::to_string(options.lora_alpha));
    if (!(options.lora_dropout >= 0.0 && options.lora_dropout < 1.0))
        throw std::invalid_argument("lora_dropout must be in [0, 1), got " +
                                    std::to_string(options.lora_dropout));
}

double lora_scaling(Index r, double lora_alpha, bool use_rslora) {
    const double rank = static_cast<double>(r);
    return use_rslora ? lora_alpha / std::sqrt(rank) : lora_alpha / rank;
}

template <class T>
T layer_scaling(const LoraOptions& options) {
    validate(options);  // first: r = 0 is that error, not an infinite scaling
    const double scaling = lora_scaling(options.r, options.lora_alpha, options.use_rslora);
    const T in_type = static_cast<T>(scaling);
    if (!std::isfinite(in_type)) {
        char text[160];
        std::snprintf(text, sizeof text, "lora_alpha=%g gives a scaling of %g, beyond %s's range",
                      options.lora_alpha, scaling, sizeof(T) == sizeof(float) ? "float32" : "float64");
        throw std::invalid_argument(text);
    }
    return in_type;
}

template float layer_scaling<float>(const LoraOptions&);
template double layer_scaling<double>(const LoraOptions&);

namespace {

template <class T>
void fill_uniform(Rng& rng, RowMatrix<T>& m, double bound) {
    for (Index i = 0; i < m.size(); ++i)
        m.data()[i] = static_cast<T>((2.0 * rng.uniform() - 1.0) * bound);
}

template <class T>
void fill_normal(Rng& rng, RowMatrix<T>& m, double stddev) {
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(rng.normal() * stddev);
}

}  // namespace

template <class T>
void init_linear_adapter(InitMode mode, std::uint64_t seed, RowMatrix<T>& a, RowMatrix<T>& b) {
    Rng rng(seed);
    const double r = static_cast<double>(a.rows());
    const double in = static_cast<double>(a.cols());
    switch (mode) {
        case InitMode::Default:
            fill_uniform(rng, a, 1.0 / std::sqrt(in));
            b.setZero();
            break;
        case InitMode::Gaussian:
            fill_normal(rng, a, 1.0 / r);
            b.setZero();
            break;
        case InitMode::Random:
            fill_uniform(rng, a, 1.0 / std::sqrt(in));
            fill_uniform(rng, b, 1.0 / std::sqrt(r));
            break;
    }
}

template <class T>
void init_embedding_adapter(InitMode mode, std::uint64_t seed, RowMatrix<T>& a, RowMatrix<T>& b) {
    Rng rng(seed);
    if (mode == InitMode::Random)
        fill_normal(rng, a, 1.0);
    else
        a.setZero();
    fill_normal(rng, b, 1.0);
}

template void init_linear_adapter<float>(InitMode, std::uint64_t, RowMatrix<float>&, RowMatrix<float>&);
template void init_linear_adapter<double>(InitMode, std::uint64_t, RowMatrix<double>&,
                                          RowMatrix<double>&);
template void init_embedding_adapter<float>(InitMode, std::uint64_t, RowMatrix<float>&,
                                            RowMatrix<float>&);
template void init_embedding_adapter<double>(InitMode, std::uint64_t, RowMatrix<double>&,
                                             RowMatrix<double>&);

}  // namespace nplora
