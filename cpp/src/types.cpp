#include "nplora/types.hpp"

namespace nplora {

std::string shape_str(Index rows, Index cols) {
    return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
}

void check_shape(const char* what, Index rows, Index cols, Index expected_rows, Index expected_cols) {
    if (rows != expected_rows || cols != expected_cols) {
        throw std::invalid_argument(std::string(what) + " must have shape " +
                                    shape_str(expected_rows, expected_cols) + ", got " +
                                    shape_str(rows, cols));
    }
}

}  // namespace nplora
