// A frozen embedding table plus a trainable low-rank update:
// out[i] = E[ids[i]] + s * B A[:, ids[i]], i.e. E[ids] + s * (A^T[ids] B^T) as PEFT writes it.
#pragma once

#include "nplora/lora_options.hpp"
#include "nplora/types.hpp"

#include <cstdint>
#include <vector>

namespace nplora {

template <class T>
class LoraEmbedding {
public:
    using value_type = T;

    // `table` is [num_embeddings, embedding_dim], owned by the caller; merge() writes into it.
    // padding_idx < 0 means none; that row of A^T never receives a gradient.
    LoraEmbedding(MatrixRef<T> table, Index padding_idx, const LoraOptions& options);

    Index num_embeddings() const { return num_; }
    Index embedding_dim() const { return dim_; }
    Index rank() const { return options_.r; }
    Index padding_idx() const { return padding_idx_; }
    T scaling() const { return scaling_; }
    bool merged() const { return merged_; }
    // A read-only weight (e.g. memory-mapped from a file) serves forward; merge() refuses it.
    bool weight_read_only() const { return weight_read_only_; }
    void set_weight_read_only(bool read_only) { weight_read_only_ = read_only; }
    const LoraOptions& options() const { return options_; }
    MatrixRef<T> weight() const { return table_; }

    RowMatrix<T>& lora_embedding_A() { return a_; }
    RowMatrix<T>& lora_embedding_B() { return b_; }
    RowMatrix<T>& lora_embedding_A_grad() { return a_grad_; }
    RowMatrix<T>& lora_embedding_B_grad() { return b_grad_; }

    // Throws std::out_of_range naming the first id outside [0, num_embeddings).
    void check_ids(const std::int64_t* ids, Index n) const;
    // out (n x dim) for ids[0..n). In training mode, keeps what backward needs.
    void forward(const std::int64_t* ids, Index n, MatrixRef<T> out, bool training);
    // Adds to both grads from grad_out (n x dim) of the last training-mode forward.
    void backward(MatrixRef<const T> grad_out);

    bool merge();
    bool unmerge();
    // out = s (B A)^T, [num_embeddings, embedding_dim] like the table.
    void delta_weight(MatrixRef<T> out) const;
    // target += sign * s (B A)^T in place, for any array of the table's shape.
    void add_delta_to(MatrixRef<T> target, T sign) const;

    bool adapter_enabled() const { return adapter_enabled_; }
    void set_adapter_enabled(bool enabled) { adapter_enabled_ = enabled; }
    void zero_grad();
    void reset_lora_parameters(InitMode mode, std::uint64_t seed);
    void clear_cache();

private:

    MatrixRef<T> table_;
    Index padding_idx_;
    LoraOptions options_;
    Index num_;
    Index dim_;
    T scaling_;
    bool merged_ = false;
    bool weight_read_only_ = false;
    bool adapter_enabled_ = true;
    RowMatrix<T> a_, b_, a_grad_, b_grad_;

    bool cache_valid_ = false;
    bool cache_merged_ = false;
    std::vector<std::int64_t> cached_ids_;
    RowMatrix<T> cached_projection_;  // A^T[ids], n x r
};

extern template class LoraEmbedding<float>;
extern template class LoraEmbedding<double>;

}  // namespace nplora
