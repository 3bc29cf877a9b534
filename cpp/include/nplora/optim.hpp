// Fused, in-place optimizer updates over one parameter array (PyTorch's AdamW and SGD semantics).
#pragma once

#include "nplora/types.hpp"

#include <cstdint>

namespace nplora {

struct AdamWHyper {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 1e-2;
};

// One AdamW step (decoupled weight decay) on n values; `step` counts from 1.
// exp_avg and exp_avg_sq are the optimizer's running moments for this parameter.
template <class T>
void adamw_step(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, Index n, const AdamWHyper& hyper,
                std::int64_t step);

struct SgdHyper {
    double lr = 1e-2;
    double momentum = 0.0;
    double dampening = 0.0;
    double weight_decay = 0.0;
    bool nesterov = false;
};

// One SGD step on n values. momentum_buffer is used when momentum != 0; on the first step
// (first_step = true) it is set to the gradient, as PyTorch does.
template <class T>
void sgd_step(T* param, const T* grad, T* momentum_buffer, Index n, const SgdHyper& hyper,
              bool first_step);

// Throws std::invalid_argument naming the hyper-parameter that is out of range.
void validate(const AdamWHyper& hyper);
void validate(const SgdHyper& hyper);

}  // namespace nplora
