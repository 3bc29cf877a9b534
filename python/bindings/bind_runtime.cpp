#include "common.hpp"

#include "nplora/gemm.hpp"
#include "nplora/kernels.hpp"
#include "nplora/parallel.hpp"

#include <cstdint>

namespace nplora::bindings {

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
    m.def("kernel_isa", &kernel_isa, "The SIMD kernels' instruction set: avx512, avx2 or none.");
    m.def("get_cblas_gemm", [] {
        const CblasGemm f = get_cblas_gemm();
        return py::make_tuple(reinterpret_cast<std::uintptr_t>(f.sgemm),
                              reinterpret_cast<std::uintptr_t>(f.dgemm), f.ilp64);
    });
}

}  // namespace nplora::bindings
