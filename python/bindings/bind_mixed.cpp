#include "common.hpp"

#include "nplora/mixed_batch.hpp"

#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace nplora::bindings {
namespace {

template <class T>
void bind_mixed_for(py::module_& m) {
    m.def(
        "mixed_linear_forward",
        [](const Array<T>& weight, std::optional<Array<T>> bias, bool fan_in_fan_out,
           const Array<T>& x, Array<T>& y, const std::vector<const LoraLinear<T>*>& layers,
           const Array<std::int64_t>& adapter_of_row) {
            const MatrixRef<const T> w = matrix_view(weight, "weight");
            const MatrixRef<const T> xv = matrix_view(x, "x");
            const MatrixRef<T> yv = mutable_matrix_view(y, "y");
            const Index in = fan_in_fan_out ? w.rows : w.cols;
            const Index out = fan_in_fan_out ? w.cols : w.rows;
            check_shape("x", xv.rows, xv.cols, xv.rows, in);
            check_shape("y", yv.rows, yv.cols, xv.rows, out);
            const T* bias_data = nullptr;
            if (bias) {
                if (bias->ndim() != 1 || bias->shape(0) != out ||
                    (out > 1 && bias->strides(0) != static_cast<py::ssize_t>(sizeof(T))))
                    throw std::invalid_argument("bias must be contiguous with shape (" +
                                                std::to_string(out) + ",), got " + shape_of(*bias));
                bias_data = bias->data();
            }
            // Each layer's A, B and scaling straight from the core: no NumPy views to make and
            // check (192 of them for 64 adapters took ~0.1 ms a call, ~1% of a 4096-wide batch).
            std::vector<AdapterRef<T>> adapters;
            adapters.reserve(layers.size());
            for (const LoraLinear<T>* layer : layers) {
                if (!layer) throw std::invalid_argument("layers must not contain None");
                if (layer->in_features() != in || layer->out_features() != out)
                    throw std::invalid_argument(
                        "every layer must have in_features " + std::to_string(in) +
                        " and out_features " + std::to_string(out) + ", got " +
                        std::to_string(layer->in_features()) + " and " +
                        std::to_string(layer->out_features()));
                adapters.push_back({layer->lora_A().data(), layer->lora_B().data(), layer->rank(),
                                    layer->scaling()});
            }
            if (adapter_of_row.ndim() != 1 || adapter_of_row.shape(0) != xv.rows ||
                (xv.rows > 1 && adapter_of_row.strides(0) != sizeof(std::int64_t)))
                throw std::invalid_argument("adapter_of_row must be contiguous with shape (" +
                                            std::to_string(xv.rows) + ",), got " +
                                            shape_of(adapter_of_row));
            const std::int64_t* index = adapter_of_row.data();
            py::gil_scoped_release release;
            mixed_linear_forward<T>(w, bias_data, fan_in_fan_out, xv, yv, adapters, index);
        },
        py::arg("weight").noconvert(), py::arg("bias").noconvert().none(true),
        py::arg("fan_in_fan_out"), py::arg("x").noconvert(), py::arg("y").noconvert(),
        py::arg("layers"), py::arg("adapter_of_row").noconvert(),
        "y = x W^T + bias, plus for each row its adapter's s (x A^T) B^T (-1: base only), the\n"
        "adapters given as the core layers (LoraLinear_float32/64) in index order.");
    m.def(
        "swap_merged",
        [](LoraLinear<T>& from, LoraLinear<T>& to) {
            py::gil_scoped_release release;
            swap_merged<T>(from, to);
        },
        py::arg("merged_layer"), py::arg("new_layer"),
        "Replace a merged adapter by another over the same weight in one pass over W.");
}

}  // namespace

void bind_mixed(py::module_& m) {
    bind_mixed_for<float>(m);
    bind_mixed_for<double>(m);
}

}  // namespace nplora::bindings
