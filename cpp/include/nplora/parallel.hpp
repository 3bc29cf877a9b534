// nplora's own small thread pool. No OpenMP: a second OpenMP runtime beside NumPy's BLAS pool makes
// both slower, and a pool we own can be sized at run time with set_num_threads.
#pragma once

#include "nplora/types.hpp"

#include <atomic>
#include <cstddef>
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

// Disjoint chunks covering [0, n) that threads take one at a time as they finish the last: a thread
// slowed by whatever else shares its core takes fewer chunks instead of holding up the whole call,
// as an even split does. Chunks shrink as the work runs out (a quarter of what is left per thread,
// clamped to [min_chunk, max_chunk], a multiple of `align` except the last), so the threads finish
// close together; work for one thread is a single chunk. Thread-safe; next() is out of line so
// kernels built for any instruction set can call it.
class ChunkQueue {
public:
    ChunkQueue(Index n, Index min_chunk, Index max_chunk, Index align, int threads);
    // The next chunk [begin, end), or false when none is left.
    bool next(Index& begin, Index& end);
    // How many threads the work is worth: at most `threads`, at most one per min_chunk.
    int threads() const { return threads_; }

private:
    Index n_, min_chunk_, max_chunk_, align_;
    int threads_;
    std::atomic<Index> next_{0};
};

// body(begin, end) over the queue's chunks, on up to queue.threads() threads. Same exception and
// busy-pool rules as parallel_for (a busy pool leaves every chunk to the caller).
void parallel_chunks(ChunkQueue& queue, const std::function<void(Index, Index)>& body);
// The same over ChunkQueue(n, min_chunk, max_chunk, align, get_num_threads()).
void parallel_chunks(Index n, Index min_chunk, Index max_chunk, Index align,
                     const std::function<void(Index, Index)>& body);

// Caller-managed threading for a BLAS (OpenBLAS >= 0.3.27: openblas_set_threads_callback_function):
// the BLAS hands over its parallel jobs and they run on this pool, so a process that mixes NumPy
// and nplora has one set of threads instead of two competing for the same cores (OpenBLAS's own
// workers spin for a while after every call). The signature is OpenBLAS's openblas_threads_callback.
extern "C" {
typedef void (*BlasJob)(int thread_num, void* job, int job_arg);
void nplora_blas_threads_callback(int sync, BlasJob job, int count, std::size_t job_size, void* jobs,
                                  int job_arg) noexcept;
}

}  // namespace nplora
