#include "nplora/lora_linear.hpp"

#include "nplora/gemm.hpp"
#include "nplora/kernels.hpp"
#include "nplora/mixed_batch.hpp"
#include "nplora/parallel.hpp"

#include <memory>
#include <stdexcept>
#include <string>

namespace nplora {

template <class T>
LoraLinear<T>::LoraLinear(MatrixRef<T> weight, const T* bias, bool fan_in_fan_out,
                          const LoraOptions& options)
    : weight_(weight),
      bias_(bias),
      fan_in_fan_out_(fan_in_fan_out),
      options_(options),
      in_(fan_in_fan_out ? weight.rows : weight.cols),
      out_(fan_in_fan_out ? weight.cols : weight.rows),
      scaling_(layer_scaling<T>(options)),
      dropout_rng_(options.seed ^ 0xD1B54A32D192ED03ull) {
    validate(options);
    if (weight.rows < 1 || weight.cols < 1)
        throw std::invalid_argument("weight must not be empty, got shape " +
                                    shape_str(weight.rows, weight.cols));
    if (weight.row_stride < weight.cols)
        throw std::invalid_argument("weight rows overlap (row stride < columns)");
    a_.resize(options.r, in_);
    b_.resize(out_, options.r);
    a_grad_ = RowMatrix<T>::Zero(options.r, in_);
    b_grad_ = RowMatrix<T>::Zero(out_, options.r);
    init_linear_adapter(options.init, options.seed, a_, b_);
}

template <class T>
void LoraLinear<T>::forward(MatrixRef<const T> x, MatrixRef<T> y, bool training) {
    const Index n = x.rows;
    check_shape("x", x.rows, x.cols, n, in_);
    check_shape("y", y.rows, y.cols, n, out_);
    const Index r = options_.r;

    const bool use_adapter = !merged_ && adapter_enabled_;
    // Disabled while merged (merge() called with the adapter off): the base layer's output is
    // x (W + s B A)^T - s (x A^T) B^T, the term taken out again rather than unmerging in a forward
    // (which PEFT does, but a forward here only reads the weight).
    const bool take_out = merged_ && !adapter_enabled_;
    const bool dropout = use_adapter && training && options_.lora_dropout > 0.0;
    if (!training) clear_cache();

    // What the LoRA branch reads: x itself, or in training a kept copy (with dropout applied).
    const T* lora_input = x.data;
    Index lora_input_stride = x.row_stride;
    if (use_adapter && training) {
        cached_input_.resize(n, in_);
        if (dropout) {
            // Inverted dropout: kept inputs are scaled by 1 / (1 - p) so the expectation is x.
            const double p = options_.lora_dropout;
            const T keep_scale = static_cast<T>(1.0 / (1.0 - p));
            cached_keep_.resize(static_cast<std::size_t>(n * in_));
            for (Index i = 0; i < n; ++i) {
                for (Index j = 0; j < in_; ++j) {
                    const bool keep = dropout_rng_.uniform() >= p;
                    cached_keep_[static_cast<std::size_t>(i * in_ + j)] = keep;
                    // x * 0 where dropped, not 0: NaN and inf stay NaN, as torch's dropout
                    // (a multiply by the mask) leaves them.
                    cached_input_(i, j) = x.data[i * x.row_stride + j] * (keep ? keep_scale : T(0));
                }
            }
        } else {
            cached_keep_.clear();
            cached_input_ = map(x);
        }
        lora_input = cached_input_.data();
        lora_input_stride = in_;
    }

    // The rank-r bottleneck dropout(x) A^T (n x r), and s times it for the output.
    // Small batches pack x once for the kernel that runs both x A^T and x W^T (when the LoRA
    // branch reads x itself, not a dropout copy).
    const bool small_batch = n <= kSmallBatchMaxRows;
    const SmallBatchPack<T> packed_x(x.data, x.row_stride, small_batch ? n : 0, in_);
    const bool lora_reads_x = lora_input == x.data && lora_input_stride == x.row_stride;
    RowMatrix<T> projection;
    RowMatrix<T> scaled_projection;
    if (use_adapter || take_out) {
        projection.resize(n, r);
        std::unique_ptr<SmallBatchPack<T>> packed_input;
        const SmallBatchPack<T>* down_pack = &packed_x;
        if (small_batch && !lora_reads_x) {
            packed_input = std::make_unique<SmallBatchPack<T>>(lora_input, lora_input_stride, n, in_);
            down_pack = packed_input.get();
        }
        SmallBatchArgs<T> down{a_.data(), in_, lora_input, lora_input_stride, nullptr, nullptr, 0,
                               nullptr, 0, 0, projection.data(), r, n, in_, r,
                               down_pack->data(), nullptr, down_pack->ld()};
        if (!small_batch || !small_batch_linear(down))
            gemm(Trans::No, Trans::Yes, n, r, in_, T(1), lora_input, lora_input_stride, a_.data(),
                 in_, T(0), projection.data(), r);
        scaled_projection = projection * (take_out ? -scaling_ : scaling_);
    }

    // Small batches: one pass over W computes x W^T + bias + (s x A^T) B^T together.
    linear_product<T>(as_const(weight_), fan_in_fan_out_, bias_, x,
                      use_adapter || take_out ? scaled_projection.data() : nullptr, b_.data(), r, y,
                      fan_in_fan_out_ ? nullptr : &packed_x);

    if (training) {
        cached_projection_ = std::move(projection);
        cache_valid_ = true;
        cache_merged_ = !use_adapter;
    }
}

template <class T>
void LoraLinear<T>::backward(MatrixRef<const T> grad_y, MatrixRef<T> grad_x) {
    if (!cache_valid_)
        throw std::runtime_error(
            "backward() needs a forward() in training mode first (merge, unmerge and swap drop "
            "what the last one kept: the weight it ran with is gone)");
    if (cache_merged_)
        throw std::runtime_error(
            "backward() after a forward through merged weights (or with the adapter disabled): "
            "unmerge() or enable the adapter before training");
    const Index n = cached_input_.rows();
    check_shape("grad_y", grad_y.rows, grad_y.cols, n, out_);
    if (grad_x.data) check_shape("grad_x", grad_x.rows, grad_x.cols, n, in_);
    const Index r = options_.r;

    // The grad of the bottleneck s G B (n x r); dB += s G^T (x A^T); dA += (s G B)^T dropout(x).
    // Thin products that read G and x once each on the SIMD kernels, else three BLAS calls.
    RowMatrix<T> grad_projection(n, r);
    if (!lora_linear_grads(grad_y.data, grad_y.row_stride, cached_input_.data(), in_, b_.data(),
                           cached_projection_.data(), scaling_, n, out_, in_, r,
                           grad_projection.data(), b_grad_.data(), a_grad_.data())) {
        gemm(Trans::No, Trans::No, n, r, out_, scaling_, grad_y.data, grad_y.row_stride, b_.data(),
             r, T(0), grad_projection.data(), r);
        gemm(Trans::Yes, Trans::No, out_, r, n, scaling_, grad_y.data, grad_y.row_stride,
             cached_projection_.data(), r, T(1), b_grad_.data(), r);
        gemm(Trans::Yes, Trans::No, r, in_, n, T(1), grad_projection.data(), r,
             cached_input_.data(), in_, T(1), a_grad_.data(), in_);
    }
    if (!grad_x.data) return;

    // dX = G W + (s G B) A: one product, the LoRA term as a second stretch of k. With dropout the
    // LoRA term goes through the mask, so it is added separately.
    GemmArgs<T> dx{};
    dx.x = grad_y.data;
    dx.ldx = grad_y.row_stride;
    dx.w = weight_.data;
    dx.ldw = weight_.row_stride;
    dx.w_trans = fan_in_fan_out_;  // W is [out, in]: G W needs no transpose
    dx.k = out_;
    if (cached_keep_.empty()) {
        dx.x2 = grad_projection.data();
        dx.ldx2 = r;
        dx.w2 = a_.data();
        dx.ldw2 = in_;
        dx.k2 = r;
    }
    dx.alpha = T(1);
    dx.beta = T(0);
    dx.c = grad_x.data;
    dx.ldc = grad_x.row_stride;
    dx.m = n;
    dx.n = in_;
    gemm_fused(dx);
    if (!cached_keep_.empty()) {
        RowMatrix<T> lora_grad(n, in_);
        gemm(Trans::No, Trans::No, n, in_, r, T(1), grad_projection.data(), r, a_.data(), in_, T(0),
             lora_grad.data(), in_);
        const T keep_scale = static_cast<T>(1.0 / (1.0 - options_.lora_dropout));
        for (Index i = 0; i < n; ++i)
            for (Index j = 0; j < in_; ++j)  // times 0 where dropped, as the forward's mask
                grad_x.data[i * grad_x.row_stride + j] +=
                    lora_grad(i, j) * (cached_keep_[static_cast<std::size_t>(i * in_ + j)] ? keep_scale : T(0));
    }
}

template <class T>
void LoraLinear<T>::add_delta_to(MatrixRef<T> target, T sign) const {
    check_shape("target", target.rows, target.cols, weight_.rows, weight_.cols);
    const Index r = options_.r;
    // A rank-r update written straight into the target: no temporary of W's size.
    if (fan_in_fan_out_)
        gemm(Trans::Yes, Trans::Yes, in_, out_, r, sign * scaling_, a_.data(), in_, b_.data(), r,
             T(1), target.data, target.row_stride);
    else
        gemm(Trans::No, Trans::No, out_, in_, r, sign * scaling_, b_.data(), r, a_.data(), in_, T(1),
             target.data, target.row_stride);
}

template <class T>
bool LoraLinear<T>::merge() {
    if (merged_) return false;
    if (weight_read_only_) throw std::invalid_argument(kReadOnlyMessage);
    add_delta_to(weight_, T(1));
    merged_ = true;
    clear_cache();  // a backward now would pair the last forward with a weight it did not use
    return true;
}

template <class T>
bool LoraLinear<T>::unmerge() {
    if (!merged_) return false;
    add_delta_to(weight_, T(-1));
    merged_ = false;
    clear_cache();
    return true;
}

template <class T>
void LoraLinear<T>::delta_weight(MatrixRef<T> out) const {
    const Index r = options_.r;
    check_shape("out", out.rows, out.cols, weight_.rows, weight_.cols);
    if (fan_in_fan_out_)
        gemm(Trans::Yes, Trans::Yes, in_, out_, r, scaling_, a_.data(), in_, b_.data(), r, T(0),
             out.data, out.row_stride);
    else
        gemm(Trans::No, Trans::No, out_, in_, r, scaling_, b_.data(), r, a_.data(), in_, T(0),
             out.data, out.row_stride);
}

template <class T>
void LoraLinear<T>::zero_grad() {
    a_grad_.setZero();
    b_grad_.setZero();
}

template <class T>
void LoraLinear<T>::reset_lora_parameters(InitMode mode, std::uint64_t seed) {
    options_.init = mode;
    options_.seed = seed;
    init_linear_adapter(mode, seed, a_, b_);
    dropout_rng_ = Rng(seed ^ 0xD1B54A32D192ED03ull);
}

template <class T>
void LoraLinear<T>::clear_cache() {
    // Eval-mode forwards call this on every call, possibly from several threads: read-only then.
    if (!cache_valid_ && cached_projection_.size() == 0) return;
    cache_valid_ = false;
    cache_merged_ = false;
    cached_input_.resize(0, 0);
    cached_projection_.resize(0, 0);
    cached_keep_.clear();
    cached_keep_.shrink_to_fit();
}

template class LoraLinear<float>;
template class LoraLinear<double>;

}  // namespace nplora
