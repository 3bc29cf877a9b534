// The core's own checks, with no Python: forward against a naive loop, finite-difference gradients,
// merge round trips, embeddings, the optimizers and the error paths.
#include "nplora/gemm.hpp"
#include "nplora/lora_embedding.hpp"
#include "nplora/lora_linear.hpp"
#include "nplora/optim.hpp"
#include "nplora/parallel.hpp"

#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <vector>

using namespace nplora;

namespace {

int g_failures = 0;

void expect(bool ok, const char* what) {
    if (!ok) {
        std::printf("FAIL: %s\n", what);
        ++g_failures;
    }
}

template <class E>
void expect_throws(const std::function<void()>& f, const char* what) {
    try {
        f();
    } catch (const E&) {
        return;
    }
    std::printf("FAIL: expected an exception: %s\n", what);
    ++g_failures;
}

RowMatrix<double> random_matrix(Index rows, Index cols, std::uint64_t seed) {
    Rng rng(seed);
    RowMatrix<double> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = rng.normal();
    return m;
}

LoraOptions options(Index r, double alpha, InitMode init = InitMode::Random) {
    LoraOptions o;
    o.r = r;
    o.lora_alpha = alpha;
    o.init = init;
    o.seed = 7;
    return o;
}

void test_linear_forward_and_merge(bool fan_in_fan_out) {
    const Index in = 5, out = 4, n = 3, r = 2;
    RowMatrix<double> w = fan_in_fan_out ? random_matrix(in, out, 1) : random_matrix(out, in, 1);
    const RowMatrix<double> w0 = w;
    std::vector<double> bias = {0.5, -1.0, 2.0, 0.25};
    LoraLinear<double> layer(MatrixRef<double>(w), bias.data(), fan_in_fan_out, options(r, 4.0));
    const RowMatrix<double> x = random_matrix(n, in, 2);
    RowMatrix<double> y(n, out);
    layer.forward(MatrixRef<const double>(x), MatrixRef<double>(y), false);

    const RowMatrix<double> w_out_in = fan_in_fan_out ? RowMatrix<double>(w0.transpose()) : w0;
    RowMatrix<double> expected = x * w_out_in.transpose() +
                                 layer.scaling() * (x * layer.lora_A().transpose()) *
                                     layer.lora_B().transpose();
    for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < out; ++j) expected(i, j) += bias[static_cast<std::size_t>(j)];
    expect((y - expected).cwiseAbs().maxCoeff() < 1e-12, "linear forward matches the formula");

    expect(layer.merge(), "merge");
    expect(!layer.merge(), "second merge does nothing");
    RowMatrix<double> y_merged(n, out);
    layer.forward(MatrixRef<const double>(x), MatrixRef<double>(y_merged), false);
    expect((y_merged - y).cwiseAbs().maxCoeff() < 1e-12, "merged forward equals unmerged");
    expect(layer.unmerge(), "unmerge");
    expect((w - w0).cwiseAbs().maxCoeff() < 1e-12, "merge then unmerge restores W");
}

void test_linear_gradients() {
    const Index in = 4, out = 3, n = 2, r = 2;
    RowMatrix<double> w = random_matrix(out, in, 3);
    LoraLinear<double> layer(MatrixRef<double>(w), nullptr, false, options(r, 3.0));
    const RowMatrix<double> x = random_matrix(n, in, 4);
    const RowMatrix<double> probe = random_matrix(n, out, 5);  // loss = sum(probe * y)
    auto loss = [&](const RowMatrix<double>& input) {
        RowMatrix<double> y(n, out);
        layer.forward(MatrixRef<const double>(input), MatrixRef<double>(y), false);
        return (y.array() * probe.array()).sum();
    };
    RowMatrix<double> y(n, out), grad_x(n, in);
    layer.forward(MatrixRef<const double>(x), MatrixRef<double>(y), true);
    layer.backward(MatrixRef<const double>(probe), MatrixRef<double>(grad_x));
    const double h = 1e-6;
    double worst = 0;
    for (Index i = 0; i < layer.lora_A().size(); ++i) {
        double& v = layer.lora_A().data()[i];
        const double keep = v;
        v = keep + h;
        const double up = loss(x);
        v = keep - h;
        const double down = loss(x);
        v = keep;
        worst = std::max(worst, std::abs((up - down) / (2 * h) - layer.lora_A_grad().data()[i]));
    }
    for (Index i = 0; i < layer.lora_B().size(); ++i) {
        double& v = layer.lora_B().data()[i];
        const double keep = v;
        v = keep + h;
        const double up = loss(x);
        v = keep - h;
        const double down = loss(x);
        v = keep;
        worst = std::max(worst, std::abs((up - down) / (2 * h) - layer.lora_B_grad().data()[i]));
    }
    for (Index i = 0; i < x.size(); ++i) {
        RowMatrix<double> moved = x;
        moved.data()[i] += h;
        const double up = loss(moved);
        moved.data()[i] -= 2 * h;
        const double down = loss(moved);
        worst = std::max(worst, std::abs((up - down) / (2 * h) - grad_x.data()[i]));
    }
    expect(worst < 1e-7, "linear gradients match finite differences");

    layer.merge();
    layer.forward(MatrixRef<const double>(x), MatrixRef<double>(y), true);
    expect_throws<std::runtime_error>(
        [&] { layer.backward(MatrixRef<const double>(probe), MatrixRef<double>(grad_x)); },
        "backward after a merged forward");
}

void test_embedding() {
    const Index num = 6, dim = 3, r = 2;
    RowMatrix<double> table = random_matrix(num, dim, 8);
    LoraEmbedding<double> emb(MatrixRef<double>(table), 0, options(r, 2.0));
    const std::vector<std::int64_t> ids = {1, 0, 5, 1};
    RowMatrix<double> out(4, dim);
    emb.forward(ids.data(), 4, MatrixRef<double>(out), true);
    double worst = 0;
    for (Index i = 0; i < 4; ++i) {
        const auto id = ids[static_cast<std::size_t>(i)];
        const RowMatrix<double> expected =
            table.row(id) + emb.scaling() * (emb.lora_embedding_B() * emb.lora_embedding_A().col(id))
                                                .transpose();
        worst = std::max(worst, (out.row(i) - expected).cwiseAbs().maxCoeff());
    }
    expect(worst < 1e-12, "embedding forward matches the formula");
    const RowMatrix<double> grad = RowMatrix<double>::Ones(4, dim);
    emb.backward(MatrixRef<const double>(grad));
    expect(emb.lora_embedding_A_grad().col(0).isZero(), "padding_idx gets no gradient");
    expect(!emb.lora_embedding_A_grad().col(1).isZero(), "looked-up ids get a gradient");
    expect(emb.lora_embedding_A_grad().col(2).isZero(), "ids not looked up get no gradient");
    const std::vector<std::int64_t> bad = {0, 6};
    expect_throws<std::out_of_range>(
        [&] { emb.forward(bad.data(), 2, MatrixRef<double>(out.data(), 2, dim), false); },
        "id out of range");
}

void test_options_and_threads() {
    RowMatrix<float> w = RowMatrix<float>::Ones(2, 2);
    expect_throws<std::invalid_argument>(
        [&] { LoraLinear<float>(MatrixRef<float>(w), nullptr, false, options(0, 1.0)); }, "r = 0");
    expect_throws<std::invalid_argument>(
        [&] { LoraLinear<float>(MatrixRef<float>(w), nullptr, false, options(1, NAN)); }, "alpha NaN");
    LoraOptions bad_dropout = options(1, 1.0);
    bad_dropout.lora_dropout = 1.0;
    expect_throws<std::invalid_argument>(
        [&] { LoraLinear<float>(MatrixRef<float>(w), nullptr, false, bad_dropout); }, "dropout 1");
    expect_throws<std::runtime_error>(
        [&] { parallel_for(100, 1, [](Index, Index end) { if (end == 100) throw std::runtime_error("x"); }); },
        "worker exceptions reach the caller");
}

void test_optimizers() {
    std::vector<double> p = {1.0, -2.0}, g = {0.5, 0.5}, m = {0, 0}, v = {0, 0};
    AdamWHyper h;
    h.lr = 0.1;
    h.weight_decay = 0.0;
    adamw_step(p.data(), g.data(), m.data(), v.data(), 2, h, 1);
    // The first Adam step moves each value by lr * sign(g) (up to eps).
    expect(std::abs(p[0] - 0.9) < 1e-6 && std::abs(p[1] + 2.1) < 1e-6, "first AdamW step");
    std::vector<double> q = {1.0}, gq = {2.0}, buf = {0};
    SgdHyper s;
    s.lr = 0.5;
    s.momentum = 0.9;
    sgd_step(q.data(), gq.data(), buf.data(), 1, s, true);
    sgd_step(q.data(), gq.data(), buf.data(), 1, s, false);
    expect(std::abs(q[0] - (1.0 - 0.5 * 2.0 - 0.5 * 3.8)) < 1e-12, "SGD with momentum");
}

}  // namespace

// Resizing the pool between jobs must not replay an old job on a new worker.
void test_pool_resize() {
    for (int round = 0; round < 50; ++round) {
        set_num_threads(1 + round % 3);
        std::vector<int> hits(1000, 0);
        parallel_for(1000, 1, [&](Index begin, Index end) {
            for (Index i = begin; i < end; ++i) hits[static_cast<std::size_t>(i)] += 1;
        });
        bool once = true;
        for (int h : hits) once = once && h == 1;
        expect(once, "every index visited exactly once after a resize");
    }
}

int main() {
    test_pool_resize();
    for (int threads : {1, 2}) {
        set_num_threads(threads);
        test_linear_forward_and_merge(false);
        test_linear_forward_and_merge(true);
        test_linear_gradients();
        test_embedding();
        test_options_and_threads();
        test_optimizers();
    }
    std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "OK", g_failures);
    return g_failures ? 1 : 0;
}
