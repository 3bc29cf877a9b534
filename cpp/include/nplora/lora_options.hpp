// What every LoRA layer is configured with, and PEFT's initialisations of A and B.
#pragma once

#include "nplora/types.hpp"

#include <cstdint>

namespace nplora {

// PEFT's init_lora_weights: True, "gaussian", False.
enum class InitMode { Default, Gaussian, Random };

struct LoraOptions {
    Index r = 8;
    double lora_alpha = 8.0;
    double lora_dropout = 0.0;
    bool use_rslora = false;
    InitMode init = InitMode::Default;
    std::uint64_t seed = 0;
};

// The message merge() throws (std::invalid_argument) for a read-only weight.
extern const char* const kReadOnlyMessage;

// Throws std::invalid_argument naming the option: r >= 1, finite alpha, dropout in [0, 1).
void validate(const LoraOptions& options);

// alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scaling(Index r, double lora_alpha, bool use_rslora);

// The scaling in the layer's type; std::invalid_argument if it does not fit (lora_alpha=1e39 on a
// float32 layer: an infinite scaling made every output NaN, even with B = 0).
template <class T>
T layer_scaling(const LoraOptions& options);

// PEFT's initialisation of a Linear adapter: A (r x in), B (out x r).
//   Default:  A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0
//   Gaussian: A ~ N(0, (1/r)^2), B = 0
//   Random:   A ~ U(+-1/sqrt(in)), B ~ U(+-1/sqrt(r))  (nn.Linear's own init for both)
template <class T>
void init_linear_adapter(InitMode mode, std::uint64_t seed, RowMatrix<T>& a, RowMatrix<T>& b);

// PEFT's initialisation of an Embedding adapter: A (r x num), B (dim x r).
//   Default, Gaussian: A = 0, B ~ N(0, 1);  Random: A, B ~ N(0, 1)
template <class T>
void init_embedding_adapter(InitMode mode, std::uint64_t seed, RowMatrix<T>& a, RowMatrix<T>& b);

}  // namespace nplora
