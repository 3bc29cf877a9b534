// A frozen linear layer plus a trainable low-rank update: y = x W^T + b + s * dropout(x) A^T B^T.
#pragma once

#include "nplora/lora_options.hpp"
#include "nplora/random.hpp"
#include "nplora/types.hpp"

#include <cstdint>
#include <vector>

namespace nplora {

template <class T>
class LoraLinear {
public:
    using value_type = T;

    // `weight` is [out, in] (PyTorch's layout), or [in, out] with fan_in_fan_out; `bias` is null or
    // `out` values. Both stay owned by the caller and must outlive the layer; merge() writes into
    // the weight.
    LoraLinear(MatrixRef<T> weight, const T* bias, bool fan_in_fan_out, const LoraOptions& options);

    Index in_features() const { return in_; }
    Index out_features() const { return out_; }
    Index rank() const { return options_.r; }
    T scaling() const { return scaling_; }
    double lora_dropout() const { return options_.lora_dropout; }
    bool fan_in_fan_out() const { return fan_in_fan_out_; }
    bool merged() const { return merged_; }
    // A read-only weight (e.g. memory-mapped from a file) serves forward; merge() refuses it.
    bool weight_read_only() const { return weight_read_only_; }
    void set_weight_read_only(bool read_only) { weight_read_only_ = read_only; }
    const LoraOptions& options() const { return options_; }
    MatrixRef<T> weight() const { return weight_; }
    const T* bias() const { return bias_; }

    RowMatrix<T>& lora_A() { return a_; }
    RowMatrix<T>& lora_B() { return b_; }
    const RowMatrix<T>& lora_A() const { return a_; }
    const RowMatrix<T>& lora_B() const { return b_; }
    RowMatrix<T>& lora_A_grad() { return a_grad_; }
    RowMatrix<T>& lora_B_grad() { return b_grad_; }

    // y (n x out) = layer(x (n x in)). In training mode, dropout is drawn and what backward needs
    // is kept; in eval mode nothing is kept.
    void forward(MatrixRef<const T> x, MatrixRef<T> y, bool training);

    // From grad_y (n x out) of the last training-mode forward: adds to lora_A_grad, lora_B_grad,
    // and writes grad_x (n x in) unless grad_x.data is null. Throws std::runtime_error without
    // such a forward, or after a forward through merged weights.
    void backward(MatrixRef<const T> grad_y, MatrixRef<T> grad_x);

    // W += s B A (or its transpose) in place, one pass over W. Returns false, changing nothing,
    // if already merged.
    bool merge();
    // W -= s B A. Returns false, changing nothing, if not merged.
    bool unmerge();
    // out = s B A, in the weight's layout ([out, in], or [in, out] with fan_in_fan_out).
    void delta_weight(MatrixRef<T> out) const;
    // target += sign * s B A in place, for any array of the weight's shape (e.g. a copy of it).
    void add_delta_to(MatrixRef<T> target, T sign) const;

    // With the adapter disabled, forward is the base layer alone (PEFT's disable_adapters).
    bool adapter_enabled() const { return adapter_enabled_; }
    void set_adapter_enabled(bool enabled) { adapter_enabled_ = enabled; }

    void zero_grad();
    // For swap_merged, which changes the weight itself: records what it did.
    void set_merged_flag(bool merged) {
        merged_ = merged;
        clear_cache();
    }
    // Re-draws A and B as PEFT initialises them, and the dropout stream, from `seed`.
    void reset_lora_parameters(InitMode mode, std::uint64_t seed);
    // Frees what the last training-mode forward kept.
    void clear_cache();

private:

    MatrixRef<T> weight_;
    const T* bias_;
    bool fan_in_fan_out_;
    LoraOptions options_;
    Index in_;
    Index out_;
    T scaling_;
    bool merged_ = false;
    bool weight_read_only_ = false;
    bool adapter_enabled_ = true;

    RowMatrix<T> a_, b_, a_grad_, b_grad_;
    Rng dropout_rng_;

    // Kept by a training-mode forward for backward.
    bool cache_valid_ = false;
    bool cache_merged_ = false;
    RowMatrix<T> cached_input_;           // dropout(x), n x in
    RowMatrix<T> cached_projection_;      // dropout(x) A^T, n x r
    std::vector<std::uint8_t> cached_keep_;  // dropout's keep mask, n x in (empty without dropout)
};

extern template class LoraLinear<float>;
extern template class LoraLinear<double>;

}  // namespace nplora
