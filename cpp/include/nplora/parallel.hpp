// nplora's own small thread pool. No OpenMP: a second OpenMP runtime beside NumPy's BLAS pool makes
// both slower, and a pool we own can be sized at run time with set_num_threads.
#pragma once

#include "nplora/types.hpp"

#include <functional>

namespace nplora {

// Threads used by the core's kernels (default: NPLORA_NUM_THREADS, else the hardware's count).
int get_num_threads();
// n >= 1; throws std::invalid_argument otherwise.
void set_num_threads(int n);

// Calls body(begin, end) over disjoint ranges covering [0, n), each at least `grain` long except the
// last, on up to get_num_threads() threads. An exception in any range is rethrown here. Calls made
// while the pool is busy (from another thread, or nested) run inline on the caller's thread.
void parallel_for(Index n, Index grain, const std::function<void(Index, Index)>& body);

}  // namespace nplora
