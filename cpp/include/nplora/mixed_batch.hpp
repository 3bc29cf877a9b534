// Many adapters over one frozen weight: mixed batches (each row its own adapter, punica-style) and
// swapping one merged adapter for another in a single pass over W.
#pragma once

#include "nplora/kernels.hpp"
#include "nplora/lora_linear.hpp"
#include "nplora/types.hpp"

#include <cstdint>
#include <vector>

namespace nplora {

// One adapter's matrices: A [r, in], B [out, r] (contiguous), and its scaling.
template <class T>
struct AdapterRef {
    const T* a;
    const T* b;
    Index r;
    T scaling;
};

// y = x W^T + bias (the base, computed once for all rows; W [out, in], or [in, out] with
// fan_in_fan_out), then for every row i with adapter_of_row[i] = k >= 0:
// y[i] += s_k (x[i] A_k^T) B_k^T. Rows are grouped by adapter (SGMV), so each adapter's A and B
// are read once per call; up to 64 rows, that work runs inside the base product's pass over W
// (mixed_small_batch_linear). Throws std::out_of_range for an index outside [-1, adapters.size()).
template <class T>
void mixed_linear_forward(MatrixRef<const T> weight, const T* bias, bool fan_in_fan_out,
                          MatrixRef<const T> x, MatrixRef<T> y,
                          const std::vector<AdapterRef<T>>& adapters,
                          const std::int64_t* adapter_of_row);

// y (n x out) = x W^T + bias + xs B^T: the product every linear forward ends in. A weight-streaming
// kernel for small batches, a BLAS-class product otherwise. xs (n x r, already scaled) may be null.
// packed_x, when given, is x already laid out for the small-batch kernel.
template <class T>
void linear_product(MatrixRef<const T> weight, bool fan_in_fan_out, const T* bias,
                    MatrixRef<const T> x, const T* xs, const T* b, Index r, MatrixRef<T> y,
                    const SmallBatchPack<T>* packed_x = nullptr);

// With `from` merged into the weight both layers share: W += s_to B_to A_to - s_from B_from A_from
// in one pass, leaving `from` unmerged and `to` merged.
template <class T>
void swap_merged(LoraLinear<T>& from, LoraLinear<T>& to);

}  // namespace nplora
