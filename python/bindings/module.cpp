// nplora._core: the only place C++ meets Python. Users import nplora, never this module.
#include "common.hpp"

#ifndef NPLORA_VERSION
#define NPLORA_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_core, m) {
    m.doc() = "nplora's compiled core (private; use the nplora package)";
    m.attr("__version__") = NPLORA_VERSION;
    nplora::bindings::bind_linear(m);
    nplora::bindings::bind_embedding(m);
    nplora::bindings::bind_optim(m);
    nplora::bindings::bind_runtime(m);
    nplora::bindings::bind_mixed(m);
}
