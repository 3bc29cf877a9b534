#include "nplora/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <thread>

#include <pthread.h>
#include <vector>

namespace nplora {
namespace {

int default_threads() {
    if (const char* env = std::getenv("NPLORA_NUM_THREADS")) {
        const int n = std::atoi(env);
        if (n >= 1) return n;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
}

// True while this thread runs a part of a pool job (the caller's part 0 included). A nested call
// then runs without the pool: its dispatch mutex may be held by this very thread.
thread_local bool tls_in_pool_job = false;

// Held for the whole of one BLAS call's jobs (nplora_blas_threads_callback). Never destroyed, like
// the pool, and made afresh in a forked child.
std::mutex& blas_call_mutex() {
    static std::mutex* const instance = new std::mutex();
    return *instance;
}

// Workers sleep on a condition variable between jobs; a job is one parallel_for call split into
// one contiguous range per thread. The caller runs range 0 itself.
class Pool {
public:
    Pool() { pthread_atfork(nullptr, nullptr, &Pool::after_fork_in_child); }
    ~Pool() { resize(0); }

    // Only the forking thread survives a fork: forget the workers (their std::thread objects refer
    // to threads that do not exist here) and start with fresh locks, so a child process
    // (multiprocessing's fork) gets a working pool instead of a deadlock.
    static void after_fork_in_child();

    int threads() const { return num_threads_.load(); }

    void set_threads(int n) {
        std::lock_guard<std::mutex> dispatch(dispatch_mutex_);
        num_threads_ = n;
        resize(n - 1);
    }

    void run(Index n, Index grain, const std::function<void(Index, Index)>& body) {
        if (n <= 0) return;
        grain = std::max<Index>(grain, 1);
        const Index max_parts = (n + grain - 1) / grain;
        const int wanted = static_cast<int>(std::min<Index>(num_threads_.load(), max_parts));
        if (wanted <= 1 || tls_in_pool_job) {
            body(0, n);
            return;
        }
        std::unique_lock<std::mutex> dispatch(dispatch_mutex_, std::try_to_lock);
        if (!dispatch.owns_lock()) {
            body(0, n);
            return;
        }
        run_parts(n, wanted, body);
    }

    // body(i, i + 1) for every i < count, all at the same time (the parts may wait on each other,
    // as OpenBLAS's threaded GEMM does): on the pool when it is free (growing it if the BLAS wants
    // more threads than set_num_threads gave; the extra workers only ever serve such calls), else on
    // the caller plus temporary threads. Never one after another.
    void run_all_at_once(int count, const std::function<void(Index, Index)>& body) {
        if (count <= 1) {
            if (count == 1) body(0, 1);
            return;
        }
        if (!tls_in_pool_job) {
            std::unique_lock<std::mutex> dispatch(dispatch_mutex_, std::try_to_lock);
            if (dispatch.owns_lock()) {
                run_parts(count, count, body);
                return;
            }
        }
        std::vector<std::thread> extra;
        extra.reserve(static_cast<std::size_t>(count - 1));
        for (int i = 1; i < count; ++i) extra.emplace_back([&body, i] { body(i, i + 1); });
        body(0, 1);
        for (auto& t : extra) t.join();
    }

private:
    // Called with dispatch_mutex_ held: `wanted` contiguous parts of [0, n), part 0 on the caller.
    void run_parts(Index n, int wanted, const std::function<void(Index, Index)>& body) {
        if (static_cast<int>(workers_.size()) < wanted - 1) resize(wanted - 1);

        const Index chunk = (n + wanted - 1) / wanted;
        std::vector<std::exception_ptr> errors(wanted);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            body_ = &body;
            n_ = n;
            chunk_ = chunk;
            parts_ = wanted;
            errors_ = &errors;
            pending_ = wanted - 1;
            ++generation_;
            posted_.store(generation_, std::memory_order_release);
        }
        wake_.notify_all();
        run_part(0);
        // The other parts usually finish within microseconds of this one: wait for them spinning
        // first, sleeping only if they take longer.
        spin_while([&] { return pending_.load(std::memory_order_acquire) != 0; });
        {
            std::unique_lock<std::mutex> lock(mutex_);
            done_.wait(lock, [&] { return pending_ == 0; });
            body_ = nullptr;
        }
        for (auto& e : errors)
            if (e) std::rethrow_exception(e);
    }

    // How long a waiting thread spins before it sleeps: about a millisecond-scale kernel's gap.
    static constexpr std::chrono::microseconds kSpin{100};

    template <class Busy>
    static void spin_while(Busy busy) {
        const auto deadline = std::chrono::steady_clock::now() + kSpin;
        for (int i = 1; busy(); ++i) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if (i % 64 == 0) {
                if (std::chrono::steady_clock::now() > deadline) return;
                // A woken worker may be put on the spinning thread's CPU: without a yield it ran
                // only once the spin ran out (batch 8 calls took 140 or 240 us instead of 30, for
                // hundreds of calls in a row, on a 2-CPU VM; yielding every 512 or 4096 pauses
                // left some of that).
                std::this_thread::yield();
            }
        }
    }

    void run_part(int part) {
        const Index begin = part * chunk_;
        const Index end = std::min(n_, begin + chunk_);
        if (begin >= end) return;
        const bool outer = tls_in_pool_job;
        tls_in_pool_job = true;
        try {
            (*body_)(begin, end);
        } catch (...) {
            (*errors_)[part] = std::current_exception();
        }
        tls_in_pool_job = outer;
    }

    // `seen` starts at the generation current when the worker was created: a worker must never
    // take an earlier job (whose body may be gone) for a new one.
    void worker_loop(int index, std::uint64_t seen) {
        for (;;) {
            // Back-to-back jobs (a layer called in a loop, NumPy's BLAS calls through the callback)
            // then start at once instead of after a futex wake-up (tens of microseconds); after
            // kSpin the worker sleeps, so an idle process costs no CPU.
            spin_while([&] { return posted_.load(std::memory_order_acquire) == seen; });
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
                if (index + 1 >= parts_) continue;
            }
            run_part(index + 1);
            {
                std::lock_guard<std::mutex> lock(mutex_);
                if (--pending_ == 0) done_.notify_one();
            }
        }
    }

    // Called with dispatch_mutex_ held (or from the destructor).
    void resize(int workers) {
        if (workers < static_cast<int>(workers_.size())) {
            {
                std::lock_guard<std::mutex> lock(mutex_);
                stop_ = true;
            }
            wake_.notify_all();
            for (auto* t : workers_) {
                t->join();
                delete t;
            }
            workers_.clear();
            stop_ = false;
        }
        while (static_cast<int>(workers_.size()) < workers) {
            const int index = static_cast<int>(workers_.size());
            std::uint64_t current;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                current = generation_;
            }
            workers_.push_back(new std::thread([this, index, current] { worker_loop(index, current); }));
        }
    }

    std::atomic<int> num_threads_{default_threads()};
    std::mutex dispatch_mutex_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
    std::vector<std::thread*> workers_;
    std::uint64_t generation_ = 0;
    bool stop_ = false;
    const std::function<void(Index, Index)>* body_ = nullptr;
    Index n_ = 0;
    Index chunk_ = 0;
    int parts_ = 0;
    std::atomic<int> pending_{0};           // written under mutex_, also read spinning
    std::atomic<std::uint64_t> posted_{0};  // generation_, for workers spinning without mutex_
    std::vector<std::exception_ptr>* errors_ = nullptr;
};

// Never destroyed: a NumPy call on another thread may still run OpenBLAS jobs through the pool
// (nplora_blas_threads_callback) while the interpreter exits and static destructors run.
Pool& pool() {
    static Pool* const instance = new Pool();
    return *instance;
}

void Pool::after_fork_in_child() {
    Pool& p = pool();
    p.workers_.clear();  // leaked on purpose: the threads are gone, their objects must not run
    new (&blas_call_mutex()) std::mutex();
    new (&p.dispatch_mutex_) std::mutex();
    new (&p.mutex_) std::mutex();
    new (&p.wake_) std::condition_variable();
    new (&p.done_) std::condition_variable();
    p.stop_ = false;
    p.body_ = nullptr;
    p.pending_ = 0;
}

}  // namespace

int get_num_threads() { return pool().threads(); }

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
    pool().set_threads(n);
}

void parallel_for(Index n, Index grain, const std::function<void(Index, Index)>& body) {
    pool().run(n, grain, body);
}

ChunkQueue::ChunkQueue(Index n, Index min_chunk, Index max_chunk, Index align, int threads)
    : n_(std::max<Index>(n, 0)), align_(std::max<Index>(align, 1)) {
    min_chunk_ = std::max<Index>((min_chunk + align_ - 1) / align_ * align_, align_);
    max_chunk_ = std::max<Index>(max_chunk / align_ * align_, min_chunk_);
    threads_ = static_cast<int>(std::max<Index>(1, std::min<Index>(threads, (n_ + min_chunk_ - 1) / min_chunk_)));
    if (threads_ == 1) min_chunk_ = max_chunk_ = std::max<Index>(n_, 1);  // alone: all in one go
}

bool ChunkQueue::next(Index& begin, Index& end) {
    Index at = next_.load(std::memory_order_relaxed);
    for (;;) {
        if (at >= n_) return false;
        const Index wanted = (n_ - at) / (4 * threads_);
        const Index chunk = std::min(std::max((wanted + align_ - 1) / align_ * align_, min_chunk_), max_chunk_);
        const Index stop = n_ - at <= chunk ? n_ : at + chunk;
        if (next_.compare_exchange_weak(at, stop, std::memory_order_relaxed)) {
            begin = at;
            end = stop;
            return true;
        }
    }
}

void parallel_chunks(ChunkQueue& queue, const std::function<void(Index, Index)>& body) {
    // One part per thread, each taking chunks until none are left.
    parallel_for(queue.threads(), 1, [&](Index, Index) {
        Index begin = 0, end = 0;
        while (queue.next(begin, end)) body(begin, end);
    });
}

void parallel_chunks(Index n, Index min_chunk, Index max_chunk, Index align,
                     const std::function<void(Index, Index)>& body) {
    if (n <= 0) return;
    ChunkQueue queue(n, min_chunk, max_chunk, align, get_num_threads());
    parallel_chunks(queue, body);
}

extern "C" void nplora_blas_threads_callback(int /*sync: always wait*/, BlasJob job, int count,
                                             std::size_t job_size, void* jobs, int job_arg) noexcept {
    // OpenBLAS's threaded GEMM jobs wait for each other (they share packed panels), so they must all
    // run at once; each gets its own thread_num below `count` (OpenBLAS picks scratch by it).
    // Nothing may be thrown into the C caller: failing to start a thread ends the process (noexcept)
    // rather than running jobs one after another, which would hang on their mutual waits.
    // One call's jobs at a time: OpenBLAS hands every call the same per-thread-number scratch
    // buffers (it serialises its own server's calls, not the callback's), so two Python threads
    // calling NumPy's matmul at once overwrote each other's packed panels (wrong products on both
    // threads, in 9 of 10 calls). A call that waits here holds nothing the running one needs: that
    // one falls back to temporary threads if the pool is busy.
    std::lock_guard<std::mutex> serialised(blas_call_mutex());
    char* const base = static_cast<char*>(jobs);
    pool().run_all_at_once(count, [&](Index i, Index) {
        job(static_cast<int>(i), base + static_cast<std::size_t>(i) * job_size, job_arg);
    });
}

}  // namespace nplora
