// Views over caller-owned memory and the Eigen types the core computes with.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

namespace nplora {

using Index = std::ptrdiff_t;

// NumPy is row-major, so every matrix the core touches is too.
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using RowMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstRowMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

// A row-major matrix in memory the core does not own. Columns are contiguous; consecutive rows are
// row_stride elements apart (row_stride >= cols). Callers with other layouts copy first.
template <class T>
struct MatrixRef {
    T* data = nullptr;
    Index rows = 0;
    Index cols = 0;
    Index row_stride = 0;

    MatrixRef() = default;
    MatrixRef(T* data_, Index rows_, Index cols_, Index row_stride_)
        : data(data_), rows(rows_), cols(cols_), row_stride(row_stride_) {}
    MatrixRef(T* data_, Index rows_, Index cols_) : MatrixRef(data_, rows_, cols_, cols_) {}
    // A view of a matrix the core owns.
    template <class U, class = decltype(std::declval<U&>().data())>
    explicit MatrixRef(U& m) : MatrixRef(m.data(), m.rows(), m.cols(), m.cols()) {}
};

template <class T>
RowMap<T> map(MatrixRef<T> m) {
    return RowMap<T>(m.data, m.rows, m.cols, Eigen::OuterStride<>(m.row_stride));
}
template <class T>
ConstRowMap<T> map(MatrixRef<const T> m) {
    return ConstRowMap<T>(m.data, m.rows, m.cols, Eigen::OuterStride<>(m.row_stride));
}
template <class T>
MatrixRef<const T> as_const(MatrixRef<T> m) {
    return MatrixRef<const T>(m.data, m.rows, m.cols, m.row_stride);
}

// "(rows, cols)", as NumPy prints a shape.
std::string shape_str(Index rows, Index cols);

// Throws std::invalid_argument "<what> must have shape (r, c), got (r2, c2)" on a mismatch.
void check_shape(const char* what, Index rows, Index cols, Index expected_rows, Index expected_cols);

}  // namespace nplora
