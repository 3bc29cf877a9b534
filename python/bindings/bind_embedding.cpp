#include "common.hpp"

#include "nplora/lora_embedding.hpp"

#include <cstdint>

namespace nplora::bindings {
namespace {

const std::int64_t* ids_view(const Array<std::int64_t>& ids) {
    if (ids.ndim() != 1) throw std::invalid_argument("ids must be 1-D, got shape " + shape_of(ids));
    if (ids.shape(0) > 1 && ids.strides(0) != static_cast<py::ssize_t>(sizeof(std::int64_t)))
        throw std::invalid_argument("ids must be contiguous");
    return ids.data();
}

template <class T>
void bind_embedding_for(py::module_& m) {
    using Layer = LoraEmbedding<T>;
    const std::string name = std::string("LoraEmbedding_") + dtype_suffix<T>();
    py::class_<Layer> cls(m, name.c_str(),
                          "C++ LoRA embedding over a caller-owned table (use nplora.LoraEmbedding).");
    cls.def(py::init([](Array<T> weight, Index padding_idx, Index r, double lora_alpha,
                        bool use_rslora, int init, std::uint64_t seed) {
                const MatrixRef<const T> w = matrix_view(weight, "weight");
                LoraOptions options;
                options.r = r;
                options.lora_alpha = lora_alpha;
                options.use_rslora = use_rslora;
                options.init = static_cast<InitMode>(init);
                options.seed = seed;
                auto layer = std::make_unique<Layer>(
                    MatrixRef<T>(const_cast<T*>(w.data), w.rows, w.cols, w.row_stride), padding_idx,
                    options);
                layer->set_weight_read_only(!weight.writeable());
                return layer;
            }),
            py::arg("weight"), py::arg("padding_idx"), py::arg("r"), py::arg("lora_alpha"),
            py::arg("use_rslora"), py::arg("init"), py::arg("seed"), py::keep_alive<1, 2>());

    def_matrix_property<Layer>(cls, "lora_embedding_A", &Layer::lora_embedding_A);
    def_matrix_property<Layer>(cls, "lora_embedding_B", &Layer::lora_embedding_B);
    def_matrix_property<Layer>(cls, "lora_embedding_A_grad", &Layer::lora_embedding_A_grad);
    def_matrix_property<Layer>(cls, "lora_embedding_B_grad", &Layer::lora_embedding_B_grad);
    cls.def_property_readonly("num_embeddings", &Layer::num_embeddings)
        .def_property_readonly("embedding_dim", &Layer::embedding_dim)
        .def_property_readonly("padding_idx", &Layer::padding_idx);
    def_layer_common<Layer>(cls);

    cls.def(
        "forward",
        [](Layer& layer, const Array<std::int64_t>& ids, Array<T>& out, bool training) {
            const std::int64_t* id_data = ids_view(ids);
            const Index n = ids.shape(0);
            const MatrixRef<T> out_view = mutable_matrix_view(out, "out");
            py::gil_scoped_release release;
            layer.forward(id_data, n, out_view, training);
        },
        py::arg("ids").noconvert(), py::arg("out").noconvert(), py::arg("training"));
    cls.def(
        "check_ids",
        [](const Layer& layer, const Array<std::int64_t>& ids) {
            const std::int64_t* id_data = ids_view(ids);
            const Index n = ids.shape(0);
            py::gil_scoped_release release;
            layer.check_ids(id_data, n);
        },
        py::arg("ids").noconvert());
    cls.def(
        "backward",
        [](Layer& layer, const Array<T>& grad_out) {
            const MatrixRef<const T> g = matrix_view(grad_out, "grad_out");
            py::gil_scoped_release release;
            layer.backward(g);
        },
        py::arg("grad_out").noconvert());
}

}  // namespace

void bind_embedding(py::module_& m) {
    bind_embedding_for<float>(m);
    bind_embedding_for<double>(m);
}

}  // namespace nplora::bindings
