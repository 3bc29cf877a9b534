#include "common.hpp"

#include "nplora/lora_linear.hpp"

#include <pybind11/stl.h>

#include <cstdint>
#include <optional>

namespace nplora::bindings {
namespace {

template <class T>
void bind_linear_for(py::module_& m) {
    using Layer = LoraLinear<T>;
    const std::string name = std::string("LoraLinear_") + dtype_suffix<T>();
    py::class_<Layer> cls(m, name.c_str(),
                          "C++ LoRA linear layer over a caller-owned weight (use nplora.LoraLinear).");
    cls.def(py::init([](Array<T> weight, std::optional<Array<T>> bias, bool fan_in_fan_out, Index r,
                        double lora_alpha, double lora_dropout, bool use_rslora, int init,
                        std::uint64_t seed) {
                const MatrixRef<const T> w = matrix_view(weight, "weight");
                const T* bias_data = nullptr;
                if (bias) {
                    const Index out = fan_in_fan_out ? w.cols : w.rows;
                    if (bias->ndim() != 1 || bias->shape(0) != out)
                        throw std::invalid_argument("bias must have shape (" + std::to_string(out) +
                                                    ",), got " + shape_of(*bias));
                    if (out > 1 && bias->strides(0) != static_cast<py::ssize_t>(sizeof(T)))
                        throw std::invalid_argument("bias must be contiguous");
                    bias_data = bias->data();
                }
                LoraOptions options;
                options.r = r;
                options.lora_alpha = lora_alpha;
                options.lora_dropout = lora_dropout;
                options.use_rslora = use_rslora;
                options.init = static_cast<InitMode>(init);
                options.seed = seed;
                auto layer = std::make_unique<Layer>(
                    MatrixRef<T>(const_cast<T*>(w.data), w.rows, w.cols, w.row_stride), bias_data,
                    fan_in_fan_out, options);
                layer->set_weight_read_only(!weight.writeable());
                return layer;
            }),
            py::arg("weight"), py::arg("bias").none(true), py::arg("fan_in_fan_out"), py::arg("r"),
            py::arg("lora_alpha"), py::arg("lora_dropout"), py::arg("use_rslora"), py::arg("init"),
            py::arg("seed"), py::keep_alive<1, 2>(), py::keep_alive<1, 3>());

    def_matrix_property<Layer>(cls, "lora_A", &Layer::lora_A);
    def_matrix_property<Layer>(cls, "lora_B", &Layer::lora_B);
    def_matrix_property<Layer>(cls, "lora_A_grad", &Layer::lora_A_grad);
    def_matrix_property<Layer>(cls, "lora_B_grad", &Layer::lora_B_grad);
    cls.def_property_readonly("in_features", &Layer::in_features)
        .def_property_readonly("out_features", &Layer::out_features)
        .def_property_readonly("fan_in_fan_out", &Layer::fan_in_fan_out);
    def_layer_common<Layer>(cls);

    cls.def(
        "forward",
        [](Layer& layer, const Array<T>& x, Array<T>& y, bool training) {
            const MatrixRef<const T> x_view = matrix_view(x, "x");
            const MatrixRef<T> y_view = mutable_matrix_view(y, "y");
            py::gil_scoped_release release;
            layer.forward(x_view, y_view, training);
        },
        py::arg("x").noconvert(), py::arg("y").noconvert(), py::arg("training"));
    cls.def(
        "backward",
        [](Layer& layer, const Array<T>& grad_y, std::optional<Array<T>> grad_x) {
            const MatrixRef<const T> gy = matrix_view(grad_y, "grad_y");
            MatrixRef<T> gx;
            if (grad_x) gx = mutable_matrix_view(*grad_x, "grad_x");
            py::gil_scoped_release release;
            layer.backward(gy, gx);
        },
        py::arg("grad_y").noconvert(), py::arg("grad_x").noconvert().none(true));
}

}  // namespace

void bind_linear(py::module_& m) {
    bind_linear_for<float>(m);
    bind_linear_for<double>(m);
}

}  // namespace nplora::bindings
