#include "common.hpp"

#include "nplora/optim.hpp"

#include <cstdint>

namespace nplora::bindings {
namespace {

// Every array of one update must be contiguous, writable where written, and of one size.
template <class T>
T* flat_data(Array<T>& a, const char* name, Index size) {
    if (!a.writeable()) throw std::invalid_argument(std::string(name) + " is read-only");
    if (a.size() != size)
        throw std::invalid_argument(std::string(name) + " must have " + std::to_string(size) +
                                    " elements, got shape " + shape_of(a));
    if (!(a.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(name) + " must be C-contiguous");
    return a.mutable_data();
}

template <class T>
void bind_optim_for(py::module_& m) {
    m.def(
        "adamw_step",
        [](Array<T> param, Array<T> grad, Array<T> exp_avg, Array<T> exp_avg_sq, double lr,
           double beta1, double beta2, double eps, double weight_decay, std::int64_t step) {
            const Index n = param.size();
            T* p = flat_data(param, "param", n);
            if (grad.size() != n || !(grad.flags() & py::array::c_style))
                throw std::invalid_argument("grad must be C-contiguous with shape " + shape_of(param) +
                                            ", got " + shape_of(grad));
            const T* g = grad.data();
            T* m1 = flat_data(exp_avg, "exp_avg", n);
            T* m2 = flat_data(exp_avg_sq, "exp_avg_sq", n);
            AdamWHyper hyper{lr, beta1, beta2, eps, weight_decay};
            validate(hyper);
            if (step < 1) throw std::invalid_argument("step must be >= 1");
            py::gil_scoped_release release;
            adamw_step(p, g, m1, m2, n, hyper, step);
        },
        py::arg("param").noconvert(), py::arg("grad").noconvert(), py::arg("exp_avg").noconvert(),
        py::arg("exp_avg_sq").noconvert(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        "One fused AdamW update of `param` in place (PyTorch's arithmetic).");
    m.def(
        "sgd_step",
        [](Array<T> param, Array<T> grad, Array<T> momentum_buffer, double lr, double momentum,
           double dampening, double weight_decay, bool nesterov, bool first_step) {
            const Index n = param.size();
            T* p = flat_data(param, "param", n);
            if (grad.size() != n || !(grad.flags() & py::array::c_style))
                throw std::invalid_argument("grad must be C-contiguous with shape " + shape_of(param) +
                                            ", got " + shape_of(grad));
            const T* g = grad.data();
            T* buf = flat_data(momentum_buffer, "momentum_buffer", n);
            SgdHyper hyper{lr, momentum, dampening, weight_decay, nesterov};
            validate(hyper);
            py::gil_scoped_release release;
            sgd_step(p, g, buf, n, hyper, first_step);
        },
        py::arg("param").noconvert(), py::arg("grad").noconvert(),
        py::arg("momentum_buffer").noconvert(), py::arg("lr"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("first_step"),
        "One fused SGD update of `param` in place (PyTorch's arithmetic).");
}

}  // namespace

void bind_optim(py::module_& m) {
    bind_optim_for<float>(m);
    bind_optim_for<double>(m);
}

}  // namespace nplora::bindings
