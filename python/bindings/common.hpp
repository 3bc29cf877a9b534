// What every binding file shares: NumPy arrays in as views (never silently converted), and layer
// matrices out as arrays that share the layer's memory.
#pragma once

#include "nplora/lora_options.hpp"
#include "nplora/types.hpp"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace nplora::bindings {

namespace py = pybind11;

// No forcecast: a wrongly typed array is a TypeError, never a hidden copy we would write into.
template <class T>
using Array = py::array_t<T, 0>;

inline std::string shape_of(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(a.shape(i));
    }
    return s + (a.ndim() == 1 ? ",)" : ")");
}

// A 2-D array with contiguous rows as a MatrixRef (no copy). The caller holds the GIL.
template <class T>
MatrixRef<const T> matrix_view(const Array<T>& a, const char* name) {
    if (a.ndim() != 2)
        throw std::invalid_argument(std::string(name) + " must be 2-D, got shape " + shape_of(a));
    const Index rows = a.shape(0), cols = a.shape(1);
    const auto item = static_cast<py::ssize_t>(sizeof(T));
    // Reading a T through a misaligned pointer is undefined behaviour (and may fault when vectorised).
    if (a.size() > 0 && reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) != 0)
        throw std::invalid_argument(std::string(name) + " is not aligned to its dtype (copy it first)");
    const bool unit_columns = cols <= 1 || a.strides(1) == item;
    const bool rows_ok = rows <= 1 || (a.strides(0) >= cols * item && a.strides(0) % item == 0);
    if (!unit_columns || !rows_ok)
        throw std::invalid_argument(std::string(name) +
                                    " must have contiguous rows (use np.ascontiguousarray)");
    const Index row_stride = rows <= 1 ? cols : a.strides(0) / item;
    return MatrixRef<const T>(a.data(), rows, cols, row_stride);
}

template <class T>
MatrixRef<T> mutable_matrix_view(Array<T>& a, const char* name) {
    if (!a.writeable()) throw std::invalid_argument(std::string(name) + " is read-only");
    const MatrixRef<const T> view = matrix_view(a, name);
    return MatrixRef<T>(a.mutable_data(), view.rows, view.cols, view.row_stride);
}

// A matrix owned by a layer, as a writable array whose base is the layer object.
template <class T>
py::array_t<T> shared_array(RowMatrix<T>& m, const py::object& owner) {
    return py::array_t<T>({m.rows(), m.cols()},
                          {static_cast<py::ssize_t>(m.cols() * sizeof(T)),
                           static_cast<py::ssize_t>(sizeof(T))},
                          m.data(), owner);
}

// Copies `value` into a layer's matrix after checking its shape (assigning keeps shared memory).
template <class T>
void assign_matrix(RowMatrix<T>& m, const py::array_t<T, py::array::forcecast>& value, const char* name) {
    if (value.ndim() != 2 || value.shape(0) != m.rows() || value.shape(1) != m.cols())
        throw std::invalid_argument(std::string(name) + " must have shape " +
                                    shape_str(m.rows(), m.cols()) + ", got " + shape_of(value));
    // Through a copy: `value` may be a view of m itself (layer.lora_A = layer.lora_A[::-1]),
    // which an element-by-element copy overwrites as it reads. A and B are small.
    auto in = value.template unchecked<2>();
    RowMatrix<T> copy(m.rows(), m.cols());
    for (Index i = 0; i < m.rows(); ++i)
        for (Index j = 0; j < m.cols(); ++j) copy(i, j) = in(i, j);
    std::copy(copy.data(), copy.data() + copy.size(), m.data());
}

template <class T>
const char* dtype_suffix();
template <>
inline const char* dtype_suffix<float>() { return "float32"; }
template <>
inline const char* dtype_suffix<double>() { return "float64"; }

// Defines a property `name` (an array sharing the layer's memory) and its checked setter.
template <class Layer, class Class, class T = typename Layer::value_type>
void def_matrix_property(Class& cls, const char* name, RowMatrix<T>& (Layer::*getter)()) {
    cls.def_property(
        name,
        [getter](py::object self) { return shared_array<T>((self.cast<Layer&>().*getter)(), self); },
        [getter, name](Layer& layer, const py::array_t<T, py::array::forcecast>& value) {
            assign_matrix<T>((layer.*getter)(), value, name);
        });
}

// The methods LoraLinear and LoraEmbedding share: merging, the delta, gradients, init, cache.
template <class Layer, class Class, class T = typename Layer::value_type>
void def_layer_common(Class& cls) {
    cls.def_property_readonly("merged", &Layer::merged)
        .def_property_readonly("weight_read_only", &Layer::weight_read_only)
        .def_property("adapter_enabled", &Layer::adapter_enabled, &Layer::set_adapter_enabled)
        .def_property_readonly("r", &Layer::rank)
        .def_property_readonly("scaling", &Layer::scaling)
        .def_property_readonly("seed", [](const Layer& l) { return l.options().seed; });
    cls.def("merge", &Layer::merge, py::call_guard<py::gil_scoped_release>(),
            "Add scaling * delta into the weight in place; False if already merged.");
    cls.def("unmerge", &Layer::unmerge, py::call_guard<py::gil_scoped_release>(),
            "Subtract scaling * delta from the weight in place; False if not merged.");
    cls.def(
        "delta_weight",
        [](const Layer& layer, Array<T>& out) {
            const MatrixRef<T> view = mutable_matrix_view(out, "out");
            py::gil_scoped_release release;
            layer.delta_weight(view);
        },
        py::arg("out").noconvert());
    cls.def(
        "add_delta_to",
        [](const Layer& layer, Array<T>& target, T sign) {
            const MatrixRef<T> view = mutable_matrix_view(target, "target");
            py::gil_scoped_release release;
            layer.add_delta_to(view, sign);
        },
        py::arg("target").noconvert(), py::arg("sign"),
        "target += sign * scaling * delta in place (target shaped like the weight).");
    cls.def("zero_grad", &Layer::zero_grad, py::call_guard<py::gil_scoped_release>());
    cls.def(
        "reset_lora_parameters",
        [](Layer& layer, int init, std::uint64_t seed) {
            layer.reset_lora_parameters(static_cast<InitMode>(init), seed);
        },
        py::arg("init"), py::arg("seed"));
    cls.def("clear_cache", &Layer::clear_cache);
}

void bind_linear(py::module_& m);
void bind_embedding(py::module_& m);
void bind_optim(py::module_& m);
void bind_runtime(py::module_& m);
void bind_mixed(py::module_& m);

}  // namespace nplora::bindings
