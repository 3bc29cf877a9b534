#include "common.hpp"

#include "nplora/gemm.hpp"
#include "nplora/kernels.hpp"
#include "nplora/parallel.hpp"

#include <cstdint>

namespace nplora::bindings {

// The core's matrix product as it is, for testing it against NumPy on every shape and layout.
template <class T>
void def_gemm(py::module_& m) {
    m.def(
        "gemm",
        [](const Array<T>& a, const Array<T>& b, Array<T>& c, bool trans_a, bool trans_b, double alpha,
           double beta) {
            const MatrixRef<const T> av = matrix_view(a, "a"), bv = matrix_view(b, "b");
            const MatrixRef<T> cv = mutable_matrix_view(c, "c");
            const Index m = trans_a ? av.cols : av.rows, k = trans_a ? av.rows : av.cols;
            const Index kb = trans_b ? bv.cols : bv.rows, n = trans_b ? bv.rows : bv.cols;
            if (k != kb || cv.rows != m || cv.cols != n)
                throw py::value_error("gemm: op(a) is " + shape_str(m, k) + ", op(b) " +
                                      shape_str(kb, n) + ", c " + shape_str(cv.rows, cv.cols));
            py::gil_scoped_release release;
            gemm(trans_a ? Trans::Yes : Trans::No, trans_b ? Trans::Yes : Trans::No, m, n, k,
                 static_cast<T>(alpha), av.data, av.row_stride, bv.data, bv.row_stride,
                 static_cast<T>(beta), cv.data, cv.row_stride);
        },
        py::arg("a"), py::arg("b"), py::arg("c").noconvert(), py::arg("trans_a") = false,
        py::arg("trans_b") = false, py::arg("alpha") = 1.0, py::arg("beta") = 0.0,
        "c = alpha * op(a) @ op(b) + beta * c on the core's current product backend (for tests).");
}

void bind_runtime(py::module_& m) {
    m.def("get_num_threads", &get_num_threads, "Threads nplora's kernels use.");
    m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the threads nplora's kernels use.");
    m.def(
        "set_cblas_gemm",
        [](std::uintptr_t sgemm, std::uintptr_t dgemm, bool ilp64) {
            CblasGemm functions;
            functions.sgemm = reinterpret_cast<void*>(sgemm);
            functions.dgemm = reinterpret_cast<void*>(dgemm);
            functions.ilp64 = ilp64;
            set_cblas_gemm(functions);
        },
        py::arg("sgemm"), py::arg("dgemm"), py::arg("ilp64"),
        "Route large products to CBLAS sgemm/dgemm at these addresses (0 = Eigen).");
    m.def("set_own_gemm", &set_own_gemm, py::arg("for_float"), py::arg("for_double"),
          "Run float32 / float64 products on nplora's packed kernels (True) or on CBLAS/Eigen.");
    m.def("own_gemm_enabled", &own_gemm_enabled, py::arg("for_double"),
          "Whether float32 (False) / float64 (True) products run on nplora's packed kernels.");
    def_gemm<float>(m);
    def_gemm<double>(m);
    m.def(
        "blas_threads_callback_address",
        [] { return reinterpret_cast<std::uintptr_t>(&nplora_blas_threads_callback); },
        "Address of the OpenBLAS threads callback that runs a BLAS's jobs on nplora's pool.");
    m.def("kernel_isa", &kernel_isa, "The SIMD kernels' instruction set: avx512, avx2 or none.");
    m.def("get_cblas_gemm", [] {
        const CblasGemm f = get_cblas_gemm();
        return py::make_tuple(reinterpret_cast<std::uintptr_t>(f.sgemm),
                              reinterpret_cast<std::uintptr_t>(f.dgemm), f.ilp64);
    });
}

}  // namespace nplora::bindings
