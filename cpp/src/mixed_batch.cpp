#include "nplora/mixed_batch.hpp"

#include "nplora/gemm.hpp"
#include "nplora/kernels.hpp"
#include "nplora/parallel.hpp"

#include <stdexcept>
#include <string>

namespace nplora {

template <class T>
void linear_product(MatrixRef<const T> weight, bool fan_in_fan_out, const T* bias,
                    MatrixRef<const T> x, const T* xs, const T* b, Index r, MatrixRef<T> y,
                    const SmallBatchPack<T>* packed_x) {
    const Index n = x.rows;
    const Index in = x.cols;
    const Index out = y.cols;
    if (!fan_in_fan_out && n <= kSmallBatchMaxRows) {
        const bool packed = packed_x && packed_x->data();
        const SmallBatchArgs<T> args{weight.data, weight.row_stride, x.data, x.row_stride, bias, xs,
                                     r, b, r, r, y.data, y.row_stride, n, in, out,
                                     packed ? packed_x->data() : nullptr, nullptr,
                                     packed ? packed_x->ld() : 0};
        if (small_batch_linear(args)) return;
    }
    // Larger batches: one packed product, the LoRA term as a second stretch of k, bias at the store.
    GemmArgs<T> args{};
    args.x = x.data;
    args.ldx = x.row_stride;
    args.w = weight.data;
    args.ldw = weight.row_stride;
    args.w_trans = !fan_in_fan_out;  // W is [out, in] unless fan_in_fan_out
    args.k = in;
    if (xs) {
        args.x2 = xs;
        args.ldx2 = r;
        args.w2 = b;
        args.ldw2 = r;
        args.w2_trans = 1;  // B is [out, r]
        args.k2 = r;
    }
    args.bias = bias;
    args.alpha = T(1);
    args.beta = T(0);
    args.c = y.data;
    args.ldc = y.row_stride;
    args.m = n;
    args.n = out;
    gemm_fused(args);
}

template <class T>
void mixed_linear_forward(MatrixRef<const T> weight, const T* bias, bool fan_in_fan_out,
                          MatrixRef<const T> x, MatrixRef<T> y,
                          const std::vector<AdapterRef<T>>& adapters,
                          const std::int64_t* adapter_of_row) {
    const Index n = x.rows;
    const Index in = x.cols;
    const Index out = y.cols;
    const auto count = static_cast<std::int64_t>(adapters.size());
    for (Index i = 0; i < n; ++i) {
        const std::int64_t k = adapter_of_row[i];
        if (k < -1 || k >= count)
            throw std::out_of_range("adapter index " + std::to_string(k) + " at row " +
                                    std::to_string(i) + " is out of range for " +
                                    std::to_string(count) + " adapters (-1 is the base model)");
    }
    // Small batches: one pass over W for every row (the outer-product kernel), x A^T before it and
    // each chunk of W's rows followed by its B term (kernels_mixed.inc).
    if (!fan_in_fan_out && n <= kSmallBatchMaxRows) {
        std::vector<const T*> a(adapters.size()), b(adapters.size());
        std::vector<Index> r(adapters.size());
        std::vector<T> scaling(adapters.size());
        for (std::size_t k = 0; k < adapters.size(); ++k) {
            a[k] = adapters[k].a;
            b[k] = adapters[k].b;
            r[k] = adapters[k].r;
            scaling[k] = adapters[k].scaling;
        }
        std::vector<Index> adapter_index(static_cast<std::size_t>(n));
        for (Index i = 0; i < n; ++i) adapter_index[static_cast<std::size_t>(i)] = static_cast<Index>(adapter_of_row[i]);
        const SmallBatchArgs<T> base{weight.data, weight.row_stride, x.data, x.row_stride, bias, nullptr,
                                     0, nullptr, 0, 0, y.data, y.row_stride, n, in, out,
                                     nullptr, nullptr, 0};
        if (mixed_small_batch_linear<T>(base, a.data(), b.data(), r.data(), scaling.data(),
                                        count, adapter_index.data()))
            return;
    }
    linear_product<T>(weight, fan_in_fan_out, bias, x, nullptr, nullptr, 0, y);
    std::vector<std::vector<Index>> rows_of(adapters.size());
    for (Index i = 0; i < n; ++i)
        if (adapter_of_row[i] >= 0) rows_of[static_cast<std::size_t>(adapter_of_row[i])].push_back(i);

    // One task per adapter with rows: gather them, run them through A then B, add them back.
    std::vector<Index> used;
    for (std::size_t k = 0; k < adapters.size(); ++k)
        if (!rows_of[k].empty()) used.push_back(static_cast<Index>(k));
    parallel_for(static_cast<Index>(used.size()), 1, [&](Index begin, Index end) {
        RowMatrix<T> gathered, down, up;
        for (Index u = begin; u < end; ++u) {
            const AdapterRef<T>& adapter = adapters[static_cast<std::size_t>(used[u])];
            const std::vector<Index>& rows = rows_of[static_cast<std::size_t>(used[u])];
            const Index m = static_cast<Index>(rows.size());
            const Index r = adapter.r;
            gathered.resize(m, in);
            for (Index i = 0; i < m; ++i) gathered.row(i) = map(x).row(rows[i]);
            down.resize(m, r);
            linear_product<T>(MatrixRef<const T>(adapter.a, r, in), false, nullptr,
                              MatrixRef<const T>(gathered.data(), m, in), nullptr, nullptr, 0,
                              MatrixRef<T>(down.data(), m, r));
            down *= adapter.scaling;
            up.resize(m, out);
            linear_product<T>(MatrixRef<const T>(adapter.b, out, r), false, nullptr,
                              MatrixRef<const T>(down.data(), m, r), nullptr, nullptr, 0,
                              MatrixRef<T>(up.data(), m, out));
            for (Index i = 0; i < m; ++i) map(y).row(rows[i]) += up.row(i);
        }
    });
}

template <class T>
void swap_merged(LoraLinear<T>& from, LoraLinear<T>& to) {
    const MatrixRef<T> w_from = from.weight(), w_to = to.weight();
    if (w_from.data != w_to.data)
        throw std::invalid_argument("swap needs two adapters over the same weight array");
    // The same first element is not enough: two views of one buffer (W and W.reshape(...)) start
    // there too, and the update would walk the wrong shape (past the end of the smaller one).
    if (w_from.rows != w_to.rows || w_from.cols != w_to.cols || w_from.row_stride != w_to.row_stride)
        throw std::invalid_argument("swap needs two adapters over the same weight array: one is over a " +
                                    std::to_string(w_from.rows) + "x" + std::to_string(w_from.cols) +
                                    " view of it, the other over a " + std::to_string(w_to.rows) +
                                    "x" + std::to_string(w_to.cols) + " view");
    if (!from.merged()) throw std::runtime_error("swap: the adapter to take out is not merged");
    if (to.merged()) throw std::runtime_error("swap: the adapter to put in is already merged");
    if (from.fan_in_fan_out() != to.fan_in_fan_out())
        throw std::invalid_argument("swap: the adapters disagree on fan_in_fan_out");
    if (from.weight_read_only()) throw std::invalid_argument(kReadOnlyMessage);
    // [s_to B_to, -s_from B_from] [A_to; A_from]: one rank-(r1 + r2) update, one pass over W.
    const Index r_to = to.rank(), r_from = from.rank(), r = r_to + r_from;
    const Index in = to.in_features(), out = to.out_features();
    RowMatrix<T> left(out, r), right(r, in);
    left.leftCols(r_to) = to.lora_B() * to.scaling();
    left.rightCols(r_from) = from.lora_B() * (-from.scaling());
    right.topRows(r_to) = to.lora_A();
    right.bottomRows(r_from) = from.lora_A();
    const MatrixRef<T> w = to.weight();
    if (to.fan_in_fan_out())
        gemm(Trans::Yes, Trans::Yes, in, out, r, T(1), right.data(), in, left.data(), r, T(1),
             w.data, w.row_stride);
    else
        gemm(Trans::No, Trans::No, out, in, r, T(1), left.data(), r, right.data(), in, T(1), w.data,
             w.row_stride);
    from.set_merged_flag(false);
    to.set_merged_flag(true);
}

#define NPLORA_INSTANTIATE(T)                                                                       \
    template void linear_product<T>(MatrixRef<const T>, bool, const T*, MatrixRef<const T>,        \
                                    const T*, const T*, Index, MatrixRef<T>,                        \
                                    const SmallBatchPack<T>*);                                      \
    template void mixed_linear_forward<T>(MatrixRef<const T>, const T*, bool, MatrixRef<const T>,  \
                                          MatrixRef<T>, const std::vector<AdapterRef<T>>&,          \
                                          const std::int64_t*);                                     \
    template void swap_merged<T>(LoraLinear<T>&, LoraLinear<T>&);
NPLORA_INSTANTIATE(float)
NPLORA_INSTANTIATE(double)
#undef NPLORA_INSTANTIATE

}  // namespace nplora
