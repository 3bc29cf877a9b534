#include "nplora/lora_embedding.hpp"

#include "nplora/gemm.hpp"
#include "nplora/parallel.hpp"

#include <cstring>
#include <stdexcept>
#include <string>

namespace nplora {

template <class T>
LoraEmbedding<T>::LoraEmbedding(MatrixRef<T> table, Index padding_idx, const LoraOptions& options)
    : table_(table),
      padding_idx_(padding_idx),
      options_(options),
      num_(table.rows),
      dim_(table.cols),
      scaling_(layer_scaling<T>(options)) {
    validate(options);
    if (table.rows < 1 || table.cols < 1)
        throw std::invalid_argument("weight must not be empty, got shape " +
                                    shape_str(table.rows, table.cols));
    if (padding_idx >= num_)
        throw std::invalid_argument("padding_idx must be < num_embeddings (" + std::to_string(num_) +
                                    "), got " + std::to_string(padding_idx));
    a_.resize(options.r, num_);
    b_.resize(dim_, options.r);
    a_grad_ = RowMatrix<T>::Zero(options.r, num_);
    b_grad_ = RowMatrix<T>::Zero(dim_, options.r);
    init_embedding_adapter(options.init, options.seed, a_, b_);
}

template <class T>
void LoraEmbedding<T>::check_ids(const std::int64_t* ids, Index n) const {
    for (Index i = 0; i < n; ++i) {
        if (ids[i] < 0 || ids[i] >= num_)
            throw std::out_of_range("index " + std::to_string(ids[i]) + " at position " +
                                    std::to_string(i) + " is out of range for " +
                                    std::to_string(num_) + " embeddings");
    }
}

template <class T>
void LoraEmbedding<T>::forward(const std::int64_t* ids, Index n, MatrixRef<T> out, bool training) {
    check_shape("out", out.rows, out.cols, n, dim_);
    check_ids(ids, n);
    const Index r = options_.r;
    if (!training) clear_cache();

    RowMap<T> result = map(out);
    const ConstRowMap<T> table = map(as_const(table_));
    // Disabled while merged (merge() called with the adapter off): the base rows are the merged
    // table's rows minus the term, as for LoraLinear.
    const bool take_out = merged_ && !adapter_enabled_;
    if ((merged_ || !adapter_enabled_) && !take_out) {
        parallel_for(n, 16, [&](Index begin, Index end) {
            for (Index i = begin; i < end; ++i) result.row(i) = table.row(ids[i]);
        });
        if (training) {
            cache_valid_ = true;
            cache_merged_ = true;
        }
        return;
    }

    // Gather A^T[ids] (n x r), expand it through B in one product, then add the table rows.
    RowMatrix<T> projection(n, r);
    for (Index i = 0; i < n; ++i) projection.row(i) = a_.col(ids[i]).transpose();
    gemm(Trans::No, Trans::Yes, n, dim_, r, take_out ? -scaling_ : scaling_, projection.data(), r,
         b_.data(), r, T(0), out.data, out.row_stride);
    parallel_for(n, 16, [&](Index begin, Index end) {
        for (Index i = begin; i < end; ++i) result.row(i) += table.row(ids[i]);
    });
    if (training && take_out) {
        cache_valid_ = true;
        cache_merged_ = true;
    } else if (training) {
        cached_ids_.assign(ids, ids + n);
        cached_projection_ = std::move(projection);
        cache_valid_ = true;
        cache_merged_ = false;
    }
}

template <class T>
void LoraEmbedding<T>::backward(MatrixRef<const T> grad_out) {
    if (!cache_valid_)
        throw std::runtime_error(
            "backward() needs a forward() in training mode first (merge and unmerge drop what the "
            "last one kept)");
    if (cache_merged_)
        throw std::runtime_error(
            "backward() after a forward through merged weights (or with the adapter disabled): "
            "unmerge() or enable the adapter before training");
    const Index n = static_cast<Index>(cached_ids_.size());
    check_shape("grad_out", grad_out.rows, grad_out.cols, n, dim_);
    const Index r = options_.r;

    // dB += s G^T A^T[ids]
    gemm(Trans::Yes, Trans::No, dim_, r, n, scaling_, grad_out.data, grad_out.row_stride,
         cached_projection_.data(), r, T(1), b_grad_.data(), r);
    // dA[:, id] += s (G B)[i] for every looked-up id but the padding one
    RowMatrix<T> grad_projection(n, r);
    gemm(Trans::No, Trans::No, n, r, dim_, scaling_, grad_out.data, grad_out.row_stride, b_.data(),
         r, T(0), grad_projection.data(), r);
    for (Index i = 0; i < n; ++i) {
        const std::int64_t id = cached_ids_[static_cast<std::size_t>(i)];
        if (id == padding_idx_) continue;
        a_grad_.col(id) += grad_projection.row(i).transpose();
    }
}

template <class T>
void LoraEmbedding<T>::add_delta_to(MatrixRef<T> target, T sign) const {
    check_shape("target", target.rows, target.cols, num_, dim_);
    // E += s A^T B^T, in place
    gemm(Trans::Yes, Trans::Yes, num_, dim_, options_.r, sign * scaling_, a_.data(), num_, b_.data(),
         options_.r, T(1), target.data, target.row_stride);
}

template <class T>
bool LoraEmbedding<T>::merge() {
    if (merged_) return false;
    if (weight_read_only_) throw std::invalid_argument(kReadOnlyMessage);
    add_delta_to(table_, T(1));
    merged_ = true;
    // As LoraLinear's: a forward before the merge serves no backward after it (its gradients would
    // be right, since they do not read the table, but one rule for both layers is easier to trust).
    clear_cache();
    return true;
}

template <class T>
bool LoraEmbedding<T>::unmerge() {
    if (!merged_) return false;
    add_delta_to(table_, T(-1));
    merged_ = false;
    clear_cache();
    return true;
}

template <class T>
void LoraEmbedding<T>::delta_weight(MatrixRef<T> out) const {
    check_shape("out", out.rows, out.cols, num_, dim_);
    gemm(Trans::Yes, Trans::Yes, num_, dim_, options_.r, scaling_, a_.data(), num_, b_.data(),
         options_.r, T(0), out.data, out.row_stride);
}

template <class T>
void LoraEmbedding<T>::zero_grad() {
    a_grad_.setZero();
    b_grad_.setZero();
}

template <class T>
void LoraEmbedding<T>::reset_lora_parameters(InitMode mode, std::uint64_t seed) {
    options_.init = mode;
    options_.seed = seed;
    init_embedding_adapter(mode, seed, a_, b_);
}

template <class T>
void LoraEmbedding<T>::clear_cache() {
    // Eval-mode forwards call this on every call, possibly from several threads: read-only then.
    if (!cache_valid_ && cached_projection_.size() == 0) return;
    cache_valid_ = false;
    cache_merged_ = false;
    cached_ids_.clear();
    cached_ids_.shrink_to_fit();
    cached_projection_.resize(0, 0);
}

template class LoraEmbedding<float>;
template class LoraEmbedding<double>;

}  // namespace nplora
