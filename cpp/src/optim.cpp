#include "nplora/optim.hpp"

#include "nplora/parallel.hpp"

#include <cmath>
#include <string>

namespace nplora {
namespace {

void require(bool ok, const char* name, double value, const char* rule) {
    if (!ok)
        throw std::invalid_argument(std::string(name) + " must be " + rule + ", got " +
                                    std::to_string(value));
}

constexpr Index kGrain = 1 << 14;

}  // namespace

void validate(const AdamWHyper& h) {
    require(std::isfinite(h.lr) && h.lr >= 0, "lr", h.lr, "a finite number >= 0");
    require(h.beta1 >= 0 && h.beta1 < 1, "beta1", h.beta1, "in [0, 1)");
    require(h.beta2 >= 0 && h.beta2 < 1, "beta2", h.beta2, "in [0, 1)");
    require(std::isfinite(h.eps) && h.eps >= 0, "eps", h.eps, "a finite number >= 0");
    require(std::isfinite(h.weight_decay) && h.weight_decay >= 0, "weight_decay", h.weight_decay,
            "a finite number >= 0");
}

void validate(const SgdHyper& h) {
    require(std::isfinite(h.lr) && h.lr >= 0, "lr", h.lr, "a finite number >= 0");
    require(std::isfinite(h.momentum) && h.momentum >= 0, "momentum", h.momentum,
            "a finite number >= 0");
    require(std::isfinite(h.dampening), "dampening", h.dampening, "finite");
    require(std::isfinite(h.weight_decay) && h.weight_decay >= 0, "weight_decay", h.weight_decay,
            "a finite number >= 0");
    if (h.nesterov && (h.momentum <= 0 || h.dampening != 0))
        throw std::invalid_argument("nesterov needs momentum > 0 and dampening == 0");
}

template <class T>
void adamw_step(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, Index n, const AdamWHyper& h,
                std::int64_t step) {
    // Arithmetic follows torch.optim.AdamW (single-tensor path) so results agree to rounding.
    const T decay = static_cast<T>(1.0 - h.lr * h.weight_decay);
    const T beta2 = static_cast<T>(h.beta2);
    const double bias_correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(step));
    const double bias_correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(step));
    const T step_size = static_cast<T>(h.lr / bias_correction1);
    const T bias_correction2_sqrt = static_cast<T>(std::sqrt(bias_correction2));
    const T eps = static_cast<T>(h.eps);
    // exp_avg.lerp_(grad, 1 - beta1) as torch computes it: from the nearer end, so that a weight
    // above 0.5 (beta1 < 0.5) does not cancel (beta1 = 0 gives exp_avg = grad exactly; the one-
    // sided form left an old moment of 1e8 at 0 instead of the new gradient's 1).
    const T weight = static_cast<T>(1.0 - h.beta1);
    const bool from_start = std::abs(weight) < T(0.5);
    parallel_for(n, kGrain, [&](Index begin, Index end) {
        for (Index i = begin; i < end; ++i) {
            const T g = grad[i];
            param[i] *= decay;
            exp_avg[i] = from_start ? exp_avg[i] + weight * (g - exp_avg[i])
                                    : g - (g - exp_avg[i]) * (T(1) - weight);
            exp_avg_sq[i] = exp_avg_sq[i] * beta2 + (T(1) - beta2) * g * g;
            const T denom = std::sqrt(exp_avg_sq[i]) / bias_correction2_sqrt + eps;
            param[i] -= step_size * exp_avg[i] / denom;
        }
    });
}

template <class T>
void sgd_step(T* param, const T* grad, T* buf, Index n, const SgdHyper& h, bool first_step) {
    const T lr = static_cast<T>(h.lr);
    const T wd = static_cast<T>(h.weight_decay);
    const T momentum = static_cast<T>(h.momentum);
    const T keep = static_cast<T>(1.0 - h.dampening);
    const bool use_momentum = h.momentum != 0.0;
    parallel_for(n, kGrain, [&](Index begin, Index end) {
        for (Index i = begin; i < end; ++i) {
            // No decay term at all when it is 0, as torch: 0 * inf would make an infinite
            // parameter NaN.
            T d = wd != T(0) ? grad[i] + wd * param[i] : grad[i];
            if (use_momentum) {
                buf[i] = first_step ? d : momentum * buf[i] + keep * d;
                d = h.nesterov ? d + momentum * buf[i] : buf[i];
            }
            param[i] -= lr * d;
        }
    });
}

template void adamw_step<float>(float*, const float*, float*, float*, Index, const AdamWHyper&,
                                std::int64_t);
template void adamw_step<double>(double*, const double*, double*, double*, Index, const AdamWHyper&,
                                 std::int64_t);
template void sgd_step<float>(float*, const float*, float*, Index, const SgdHyper&, bool);
template void sgd_step<double>(double*, const double*, double*, Index, const SgdHyper&, bool);

}  // namespace nplora
