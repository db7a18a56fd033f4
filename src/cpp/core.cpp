// bcekit._core: the Python entry point of the CPU kernels (nanobind), the ISA dispatch and the threads.
//
// Determinism: the elements are cut into fixed chunks of CHUNK elements whatever the thread count; each
// chunk's loss sum is formed in a fixed order and the chunk sums are combined pairwise in index order, so
// a result is bitwise the same for 1 thread or 64. Threads only decide who computes which chunk (they
// take them from a shared counter as they go).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <cstdlib>
#include <cstring>
#include <new>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "exact_sum.h"
#include "kernel_api.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define BCEKIT_POISON(addr, size) ASAN_POISON_MEMORY_REGION(addr, size)
#define BCEKIT_UNPOISON(addr, size) ASAN_UNPOISON_MEMORY_REGION(addr, size)
#else
#define BCEKIT_POISON(addr, size) ((void)(addr), (void)(size))
#define BCEKIT_UNPOISON(addr, size) ((void)(addr), (void)(size))
#endif

namespace nb = nanobind;

namespace bcekit {
namespace {

constexpr int64_t CHUNK = 8192;               // elements per chunk (a multiple of the vector width)
constexpr int64_t MIN_PER_THREAD = 1 << 15;   // below this many elements per thread, fewer threads
constexpr int64_t GRAB = 1;                   // chunks a thread takes at a time
// float32 gradients of at least this many bytes are written with streaming stores (see kernel_api.h):
// bigger than the last-level caches of the machines we run on, so the lines would be evicted unread
// anyway, while reading them in before overwriting them costs a quarter of a fused step's traffic.
constexpr int64_t STREAM_MIN_BYTES = int64_t(16) << 20;

// The AVX2 + FMA build where the CPU has both, unless BCEKIT_ISA=baseline asks for the baseline build
// (so tests and sanitizer runs can exercise it on any machine).
bool cpu_has_avx2() {
#if defined(BCEKIT_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    const char* requested = std::getenv("BCEKIT_ISA");
    if (requested && std::string(requested) == "baseline") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

const bool HAS_AVX2 = cpu_has_avx2();

// AVX-512 (F and DQ) for the double-double lanes, unless BCEKIT_ISA asks for baseline or avx2.
bool cpu_has_avx512() {
#if defined(BCEKIT_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    const char* requested = std::getenv("BCEKIT_ISA");
    if (requested && (std::string(requested) == "baseline" || std::string(requested) == "avx2")) return false;
    __builtin_cpu_init();
    return HAS_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
    return false;
#endif
}

const bool HAS_AVX512 = cpu_has_avx512();

const char* isa_name() { return HAS_AVX2 ? "avx2" : "baseline"; }

ChunkFn select_kernel(int dtype) {
    if (dtype == F64) return &extended_chunk;
#if defined(BCEKIT_HAVE_AVX2)
    if (HAS_AVX2) return isa_avx2::vector_kernel(dtype);
#endif
    return isa_baseline::vector_kernel(dtype);
}

// A cache of output buffers. A training step allocates a fresh input-sized gradient every time and the
// kernel's stores then fault its pages in one by one: for 2^24 float32 that costs about twice the pass
// itself. Buffers come back here when the tensor or array that owns them is freed (its storage, so
// views keep a buffer alive) and are handed out again, already mapped, for a request of their size or
// up to 1/8 smaller.
//
// What it keeps is bounded three ways: at most `limit` bytes (BCEKIT_CACHE_BYTES, default 1 GiB; 0
// disables it), the least recently returned buffers going first; a buffer not handed out again within
// the next MAX_AGE requests is released (so a workload whose sizes vary keeps only what its recent
// requests could use, not one buffer per size it ever asked for); empty_cache() releases everything.
// Every buffer is its own anonymous mapping (mmap), so releasing one gives its pages back to the
// system at once rather than to the C heap, which may keep them.
//
// Buffers of HUGE_MIN bytes and more start on a 2 MiB boundary, and on Linux their whole 2 MiB pages
// are advised as transparent huge pages (MADV_HUGEPAGE, which the common THP setting "madvise" honours):
// a pass streaming through a gradient then takes a TLB miss per 2 MiB instead of per 4 KiB, 3-6% of a
// 2^24 float32 pass on the CI machine. The header then sits at the end of a 2 MiB prefix of which only
// its 4 KiB page is ever touched, and a tail short of a whole 2 MiB page keeps small pages, so resident
// memory stays that of the data. Smaller buffers start one page after their mapping's start.
class BufferCache {
  public:
    static constexpr size_t HEADER = 64;  // the size is kept just before the data (64-byte aligned)
    static constexpr size_t PAGE = size_t(1) << 12;
    static constexpr size_t HUGE = size_t(1) << 21;
    static constexpr size_t HUGE_MIN = size_t(1) << 22;
    static constexpr uint64_t MAX_AGE = 32;  // requests a cached buffer waits for before it is released

    void* get(size_t bytes) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            ++clock_;
            release_old();
            // the smallest cached buffer that fits, if it wastes at most 1/8 of itself
            auto it = by_size_.lower_bound(bytes);
            if (it != by_size_.end() && it->first - bytes <= it->first / 8) {
                Entry entry = *it->second;
                lru_.erase(it->second);
                by_size_.erase(it);
                cached_ -= entry.bytes;
                char* data = entry.block + prefix(entry.bytes);
                BCEKIT_UNPOISON(data, bytes);
                return data;
            }
        }
        const size_t before = prefix(bytes);
        char* block = map(bytes);
        char* data = block + before;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (bytes >= HUGE_MIN) madvise(data, bytes / HUGE * HUGE, MADV_HUGEPAGE);  // advice: failure is harmless
#endif
        std::memcpy(data - HEADER, &bytes, sizeof bytes);
        // under ASan, the header and the padding around the data are off limits: an overrun is reported
        BCEKIT_POISON(block, before);
        BCEKIT_POISON(data + bytes, span(bytes) - before - bytes);
        return data;
    }

    void put(void* data) noexcept {
        char* header = static_cast<char*>(data) - HEADER;
        size_t bytes;
        BCEKIT_UNPOISON(header, HEADER);
        std::memcpy(&bytes, header, sizeof bytes);
        BCEKIT_POISON(header, HEADER);
        char* block = static_cast<char*>(data) - prefix(bytes);
        std::lock_guard<std::mutex> lock(mutex_);
        if (bytes > limit_) {
            unmap(block, bytes);
            return;
        }
        BCEKIT_POISON(data, bytes);  // a cached buffer is not to be touched until handed out
        lru_.push_front(Entry{bytes, block, clock_});
        by_size_.emplace(bytes, lru_.begin());
        cached_ += bytes;
        while (cached_ > limit_) release_last();
    }

    void clear() noexcept {
        std::lock_guard<std::mutex> lock(mutex_);
        while (!lru_.empty()) release_last();
    }

    size_t cached() {
        std::lock_guard<std::mutex> lock(mutex_);
        return cached_;
    }
    void set_limit(size_t limit) {
        std::lock_guard<std::mutex> lock(mutex_);
        limit_ = limit;
        while (cached_ > limit_) release_last();
    }

  private:
    struct Entry {
        size_t bytes;
        char* block;
        uint64_t returned;  // clock_ when it came back
    };

    // the bytes before the data (the header last among them), and the whole mapping
    static size_t prefix(size_t bytes) { return bytes >= HUGE_MIN ? HUGE : PAGE; }
    static size_t span(size_t bytes) { return prefix(bytes) + (bytes + PAGE - 1) / PAGE * PAGE; }

    // A mapping of span(bytes) whose data part starts on a multiple of prefix(bytes): for the 2 MiB
    // alignment, one HUGE more is mapped and the excess before and after is unmapped again.
    static char* map(size_t bytes) {
        const size_t length = span(bytes);
        const size_t extra = bytes >= HUGE_MIN ? HUGE : 0;
        void* raw =
            mmap(nullptr, length + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) throw std::bad_alloc();
        char* start = static_cast<char*>(raw);
        if (!extra) return start;
        const uintptr_t address = reinterpret_cast<uintptr_t>(start);
        char* block = start + (HUGE - address % HUGE) % HUGE;
        if (block > start) munmap(start, size_t(block - start));
        munmap(block + length, size_t(start + extra - block));  // what lies past block + length
        return block;
    }
    static void unmap(char* block, size_t bytes) noexcept {
        BCEKIT_UNPOISON(block, span(bytes));
        munmap(block, span(bytes));
    }

    // under mutex_
    void release_last() noexcept {
        const Entry& entry = lru_.back();
        auto range = by_size_.equal_range(entry.bytes);
        for (auto it = range.first; it != range.second; ++it) {
            if (it->second == std::prev(lru_.end())) {
                by_size_.erase(it);
                break;
            }
        }
        cached_ -= entry.bytes;
        unmap(entry.block, entry.bytes);
        lru_.pop_back();
    }
    void release_old() noexcept {
        while (!lru_.empty() && clock_ - lru_.back().returned > MAX_AGE) release_last();
    }

    std::mutex mutex_;
    std::list<Entry> lru_;  // most recently returned first
    std::multimap<size_t, std::list<Entry>::iterator> by_size_;
    size_t cached_ = 0;
    size_t limit_ = size_t(1) << 30;
    uint64_t clock_ = 0;  // requests so far
};

BufferCache& cache() {
    static BufferCache* instance = new BufferCache();  // never destroyed: buffers may outlive the module
    return *instance;
}

// Starts a thread running f(args...), or returns false when the system refuses one (a memory, process
// or thread limit): a pass then runs on the threads it already has, which changes only its speed.
// fail_thread_starts(k) makes the next k starts fail, so tests can take that path anywhere.
std::atomic<int64_t> failing_starts{0};

bool take_failing_start() noexcept {
    for (int64_t left = failing_starts.load(); left > 0;)
        if (failing_starts.compare_exchange_weak(left, left - 1)) return true;
    return false;
}

template <class F, class... A>
bool start_thread(std::vector<std::thread>* joinable, F&& f, A&&... args) noexcept {
    try {
        if (take_failing_start())
            throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
        std::thread thread(std::forward<F>(f), std::forward<A>(args)...);
        if (joinable) {
            joinable->push_back(std::move(thread));  // reserved by the caller: cannot throw
        } else {
            thread.detach();
        }
        return true;
    } catch (const std::exception&) {  // std::system_error (EAGAIN), or std::bad_alloc for its state
        return false;
    }
}

// Worker threads kept between passes. Starting a thread and joining it costs ~80 us on the machines we
// measured, more than a pass over 2^16 elements, so the runner parks its helpers here instead: they
// spin briefly for the next pass, then sleep on a condition variable.
//
// A helper that wakes late (on a virtual machine an idle CPU can take a millisecond to wake) must not
// hold the pass up: the chunks are taken from a shared counter, so the runner's own thread simply does
// more of them. Helpers therefore enter a pass through a gate the runner closes when it has run out of
// chunks, and the runner waits only for the helpers that entered before that.
//
// One pass uses the pool at a time (a second Python thread calling meanwhile runs its pass on freshly
// started threads instead). After fork() the child has none of the parent's threads: it abandons the
// parent's pool object (its mutexes may be held) and starts its own on demand.
class WorkerPool {
  public:
    // Runs work(0) here and work(1) .. work(helpers) on pooled threads (each helper's call may be
    // skipped, see above); returns when every call made has returned. False (nothing run) when another
    // pass holds the pool.
    bool run(int64_t helpers, const std::function<void(int64_t)>& work) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            while (int64_t(threads_) < helpers &&
                   start_thread(nullptr, &WorkerPool::loop, this, int64_t(threads_) + 1))
                ++threads_;
            work_ = &work;
            helpers_ = std::min(helpers, int64_t(threads_));
            open_ = true;
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        work(0);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            open_ = false;  // from here on, a helper that wakes up skips this pass
        }
        for (int spin = 0; spin < SPIN && active_.load(std::memory_order_acquire) != 0; ++spin) {
        }
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return active_.load(std::memory_order_acquire) == 0; });
        return true;
    }

  private:
    static constexpr int SPIN = 20000;  // polls of an atomic (tens of microseconds) before sleeping

    void loop(int64_t index) {
        uint64_t seen = 0;
        for (;;) {
            for (int spin = 0; spin < SPIN && generation_.load(std::memory_order_acquire) == seen; ++spin) {
            }
            const std::function<void(int64_t)>* work;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
                seen = generation_.load(std::memory_order_relaxed);
                if (!open_ || index > helpers_) continue;  // the pass is over, or does not need this one
                active_.fetch_add(1, std::memory_order_relaxed);  // the gate, under the mutex closing takes
                work = work_;
            }
            (*work)(index);
            if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                std::lock_guard<std::mutex> lock(mutex_);  // the runner checks active_ under it
                done_.notify_one();
            }
        }
    }

    std::mutex busy_;   // held by the pass using the pool
    std::mutex mutex_;  // guards the fields below and the condition variables
    std::condition_variable wake_, done_;
    std::atomic<uint64_t> generation_{0};
    const std::function<void(int64_t)>* work_ = nullptr;
    int64_t helpers_ = 0;
    bool open_ = false;
    std::atomic<int64_t> active_{0};  // helpers inside the current pass's work
    size_t threads_ = 0;
};

std::atomic<WorkerPool*> pool_instance{nullptr};

// the parent's threads do not exist in a forked child (which runs one thread at this point)
void forget_pool_in_child() { pool_instance.store(nullptr, std::memory_order_relaxed); }

WorkerPool& pool() {
    static const bool registered = (pthread_atfork(nullptr, nullptr, &forget_pool_in_child), true);
    (void)registered;
    WorkerPool* current = pool_instance.load(std::memory_order_acquire);
    if (!current) {  // never destroyed: its threads never exit
        WorkerPool* created = new WorkerPool();
        if (pool_instance.compare_exchange_strong(current, created, std::memory_order_acq_rel)) {
            current = created;
        } else {
            delete created;  // another caller's pool came first (no thread started in ours yet)
        }
    }
    return *current;
}

// Runs task(0) .. task(tasks - 1) on `threads` threads (this one and pooled helpers), each task once.
// Threads take GRAB tasks at a time from a shared counter rather than a fixed share: on a machine whose
// cores run at different speeds (a busy neighbour, a virtual CPU), the fast one does more. Which thread
// runs a task must never change its result.
template <class F>
void parallel(int64_t tasks, int64_t threads, const F& task) {
    std::atomic<int64_t> next{0};
    auto work = [&](int64_t) {
        for (;;) {
            const int64_t first = next.fetch_add(GRAB, std::memory_order_relaxed);
            if (first >= tasks) break;
            for (int64_t c = first; c < std::min(tasks, first + GRAB); ++c) task(c);
        }
    };
    if (threads <= 1) {
        work(0);
    } else if (!pool().run(threads - 1, work)) {  // the pool is busy with another caller's pass
        std::vector<std::thread> helpers;
        helpers.reserve(size_t(threads - 1));
        for (int64_t w = 1; w < threads && start_thread(&helpers, work, w); ++w) {
        }
        work(0);
        for (auto& th : helpers) th.join();
    }
}

long double pairwise(const std::vector<ChunkResult>& parts, size_t lo, size_t hi) {
    if (hi - lo == 1) return parts[lo].sum;
    size_t mid = lo + (hi - lo) / 2;
    return pairwise(parts, lo, mid) + pairwise(parts, mid, hi);
}

struct RunResult {
    long double sum = 0.0L;
    int64_t kept = 0;
    int flags = 0;  // 1: an input outside [0, 1]; 2: a target outside [0, 1] (probability loss)
};

// The double-double lanes and the exact block sums of one ISA's build ("auto": the best this CPU runs).
struct DoubleDouble {
    LossBlockFn losses64;
    LevelSumsFn level_sums;
};

DoubleDouble select_dd(const std::string& isa) {
#if defined(BCEKIT_HAVE_AVX2)
    if (isa == "avx512" || (isa == "auto" && HAS_AVX512)) {
        if (!HAS_AVX512) throw std::invalid_argument("bcekit._core: this CPU has no AVX-512 (F, DQ)");
        return {&isa_avx512::losses64, &isa_avx512::level_sums};
    }
    if (isa == "avx2" || (isa == "auto" && HAS_AVX2)) {
        if (!HAS_AVX2) throw std::invalid_argument("bcekit._core: this CPU has no AVX2 + FMA");
        return {&isa_avx2::losses64, &isa_avx2::level_sums};
    }
#endif
    if (isa == "baseline" || isa == "auto") return {&isa_baseline::losses64, &isa_baseline::level_sums};
    throw std::invalid_argument("bcekit._core: isa must be 'auto', 'baseline', 'avx2' or 'avx512'");
}

// Runs the pass; returns the kept elements' loss sum (if asked), their count and the range flags.
RunResult run(Args args, int threads) {
    const ChunkFn fn = select_kernel(args.dtype);
    args.stream_outputs = args.dtype == F32 && args.grad_input && args.n * 4 >= STREAM_MIN_BYTES &&
                          reinterpret_cast<uintptr_t>(args.grad_input) % 32 == 0;
    if (!fn) throw std::invalid_argument("bcekit._core: unsupported dtype");
    if (args.dtype == F64) args.losses64 = select_dd("auto").losses64;
    const int64_t n = args.n;
    if (n == 0) return {};
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
    std::vector<ChunkResult> parts(static_cast<size_t>(chunks));
    int64_t t = std::max<int64_t>(1, std::min<int64_t>({int64_t(threads), chunks, n / MIN_PER_THREAD}));
    parallel(chunks, t, [&](int64_t c) { parts[size_t(c)] = fn(args, c * CHUNK, std::min(n, (c + 1) * CHUNK)); });
    RunResult r;
    for (const auto& p : parts) {
        r.kept += p.kept;
        r.flags |= (p.bad_input ? 1 : 0) | (p.bad_target ? 2 : 0);
    }
    r.sum = args.want_sum ? pairwise(parts, 0, parts.size()) : 0.0L;
    return r;
}

using In = nb::ndarray<nb::ro, nb::device::cpu, nb::c_contig>;  // read in place (read-only views too)
using Out = nb::ndarray<nb::device::cpu, nb::c_contig>;

template <class A>
int dtype_of(const A& a) {
    const nb::dlpack::dtype d = a.dtype();
    if (d.lanes == 1) {
        if (d.code == uint8_t(nb::dlpack::dtype_code::Float)) {
            if (d.bits == 32) return F32;
            if (d.bits == 64) return F64;
            if (d.bits == 16) return F16;
        }
        if (d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return BF16;
    }
    throw std::invalid_argument("bcekit._core: arrays must be float16, bfloat16, float32 or float64");
}

template <class A>
const void* operand(const std::optional<A>& a, const char* name, int dtype, int64_t size,
                    bool exact_size = true) {
    if (!a) return nullptr;
    if (dtype_of(*a) != dtype)
        throw std::invalid_argument(std::string("bcekit._core: '") + name + "' has another dtype than 'input'");
    const int64_t got = int64_t(a->size());
    if (exact_size ? got != size : got < size)
        throw std::invalid_argument(std::string("bcekit._core: '") + name + "' has " + std::to_string(got) +
                                    " elements, expected " + std::to_string(size));
    return a->data();
}

int64_t weight_size(int mode, int64_t n, int64_t inner) {
    switch (mode) {
        case SCALAR: return 1;
        case PER_CLASS: return inner;
        case PER_ROW: return inner > 0 ? (n + inner - 1) / inner : 0;
        case FULL: return n;
        default: throw std::invalid_argument("bcekit._core: unknown broadcast form");
    }
}

std::tuple<double, int64_t, int> finish(Args& a, int kind, int reduction, double label_smoothing,
                                        std::optional<double> ignore_index, int threads) {
    if (kind != PROBABILITIES && kind != LOGITS) throw std::invalid_argument("bcekit._core: bad kind");
    if (reduction < 0 || reduction > 2) throw std::invalid_argument("bcekit._core: bad reduction");
    a.want_sum = reduction != REDUCE_NONE;
    a.label_smoothing = label_smoothing;
    a.has_ignore = ignore_index.has_value();
    a.ignore_index = ignore_index.value_or(0.0);
    RunResult r;
    {
        nb::gil_scoped_release release;
        r = run(a, threads);
    }
    // reduction: 0 none, 1 mean (over the kept elements; NaN when none is kept), 2 sum
    long double value = r.sum;
    if (reduction == REDUCE_MEAN) value = r.kept ? value / r.kept : std::numeric_limits<long double>::quiet_NaN();
    return {double(value), r.kept, r.flags};
}

// A pass on raw data pointers (torch tensors: no DLPack round trip). The caller (bcekit._native) has
// checked every pointer's dtype, contiguity and size.
std::tuple<double, int64_t, int> run_pointers(int kind, int dtype, int64_t n, uintptr_t x, uintptr_t y, uintptr_t w,
                                              int w_mode, int64_t w_inner, uintptr_t p, int p_mode, int64_t p_inner,
                                              uintptr_t grad_output, double grad_scale, uintptr_t loss,
                                              uintptr_t grad_input, uintptr_t grad_target, int reduction,
                                              double label_smoothing, std::optional<double> ignore_index,
                                              int threads) {
    if (dtype < 0 || dtype > 3) throw std::invalid_argument("bcekit._core: bad dtype");
    Args a;
    a.kind = kind;
    a.dtype = dtype;
    a.n = n;
    a.x = reinterpret_cast<const void*>(x);
    a.y = reinterpret_cast<const void*>(y);
    a.w = reinterpret_cast<const void*>(w);
    a.w_mode = w ? w_mode : ABSENT;
    a.w_inner = w_inner;
    a.p = reinterpret_cast<const void*>(p);
    a.p_mode = p ? p_mode : ABSENT;
    a.p_inner = p_inner;
    a.grad_output = reinterpret_cast<const void*>(grad_output);
    a.grad_scale = grad_scale;
    a.loss = reinterpret_cast<void*>(loss);
    a.grad_input = reinterpret_cast<void*>(grad_input);
    a.grad_target = reinterpret_cast<void*>(grad_target);
    return finish(a, kind, reduction, label_smoothing, ignore_index, threads);
}

constexpr int64_t BLOCK = 256;  // elements per call of the double-double lanes (in L1)

// What `bcekit score` needs of one label over one batch: the exact sum of the kept elements' float64
// losses, their count, and which checks failed (the Python layer then finds the row and says why).
enum ScoreFlags : int { BAD_PREDICTION = 1, BAD_TARGET = 2, BAD_WEIGHT = 4 };
struct LabelScore {
    ExactSum sum;
    int64_t kept = 0;
    int flags = 0;
};

struct ScoreJob {
    LossBlock options;  // kind, smoothing, ignore; the pointers are set per block
    int64_t n = 0;
    std::vector<const double*> x, y;
    std::vector<double> pos_weight;  // one per label, or empty
    std::vector<double*> loss;       // one per label (per-element losses out), or empty
    const double* w = nullptr;
};

void score_chunk(const DoubleDouble& dd, const ScoreJob& job, size_t label, int64_t begin, int64_t end,
                 LabelScore& out) {
    double loss[BLOCK], p[BLOCK];
    uint8_t slow[BLOCK];
    LossBlock b = job.options;
    const bool logits = b.kind == LOGITS;
    const bool nan_ignore = b.has_ignore && std::isnan(b.ignore_index);
    if (!job.pos_weight.empty()) {
        std::fill(p, p + BLOCK, job.pos_weight[label]);
        b.p = p;
    }
    for (int64_t start = begin; start < end; start += BLOCK) {
        b.n = std::min(BLOCK, end - start);
        b.x = job.x[label] + start;
        b.y = job.y[label] + start;
        b.w = job.w ? job.w + start : nullptr;
        exact_losses64(dd.losses64, b, loss, slow);
        double levels[64];
        const int64_t count = dd.level_sums(loss, b.n, levels, 64);
        if (count < 0) {
            out.sum.add(loss, b.n);
        } else {
            for (int64_t k = 0; k < count; ++k) out.sum.add(levels[k]);
        }
        // the checks, in branch-free loops the compiler vectorises
        int bad_x = 0, bad_y = 0, bad_w = 0;
        int64_t kept = 0;
        for (int64_t i = 0; i < b.n; ++i) {
            const double x = b.x[i], y = b.y[i];
            const bool keep = !b.has_ignore || (nan_ignore ? y == y : y != b.ignore_index);
            kept += keep;
            bad_x |= logits ? x != x : !(x >= 0.0 && x <= 1.0);
            bad_y |= keep & !(y >= 0.0 && y <= 1.0);
        }
        if (b.w)
            for (int64_t i = 0; i < b.n; ++i) bad_w |= !(b.w[i] - b.w[i] == 0.0);  // NaN for inf and NaN
        out.kept += kept;
        out.flags |= (bad_x ? BAD_PREDICTION : 0) | (bad_y ? BAD_TARGET : 0) | (bad_w ? BAD_WEIGHT : 0);
        if (!job.loss.empty()) std::memcpy(job.loss[label] + start, loss, size_t(b.n) * sizeof(double));
    }
}

// Every label of a batch, in chunks of CHUNK elements on `threads` threads; the chunk sums are exact, so
// the result is the same for any thread count and any batching of the rows.
std::vector<LabelScore> score(const ScoreJob& job, int threads) {
    const DoubleDouble dd = select_dd("auto");
    const size_t labels = job.x.size();
    const int64_t chunks = (job.n + CHUNK - 1) / CHUNK;
    const int64_t tasks = chunks * int64_t(labels);
    std::vector<LabelScore> parts(static_cast<size_t>(tasks));
    const int64_t t = std::max<int64_t>(
        1, std::min<int64_t>({int64_t(threads), tasks, job.n * int64_t(labels) / MIN_PER_THREAD}));
    parallel(tasks, t, [&](int64_t task) {
        const size_t label = size_t(task / chunks);
        const int64_t c = task % chunks;
        score_chunk(dd, job, label, c * CHUNK, std::min(job.n, (c + 1) * CHUNK), parts[size_t(task)]);
    });
    std::vector<LabelScore> result(labels);
    for (int64_t task = 0; task < tasks; ++task) {
        LabelScore& r = result[size_t(task / chunks)];
        r.sum.add(parts[size_t(task)].sum);
        r.kept += parts[size_t(task)].kept;
        r.flags |= parts[size_t(task)].flags;
    }
    return result;
}

// Lines in [begin, end): its line ends, and a last line without one (a loop the compiler vectorises)
int64_t count_lines(const char* begin, const char* end) {
    int64_t ends = 0;
    for (const char* p = begin; p < end; ++p) ends += *p == '\n';
    return ends + (end > begin && end[-1] != '\n');
}

// A CSV buffer cut into parts at line ends, one per thread, and the first row of each.
struct CsvParts {
    std::vector<const char*> cuts;
    std::vector<int64_t> first;  // first[k]: part k's first row; first.back(): the lines in all
};

CsvParts cut_csv(const char* data, size_t size, int threads) {
    const char* end = data + size;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, int64_t(size >> 16)));
    CsvParts plan;
    plan.cuts.push_back(data);
    for (int64_t k = 1; k < parts; ++k) {
        const char* at = std::max(plan.cuts.back(), data + size * size_t(k) / size_t(parts));
        const char* stop = static_cast<const char*>(std::memchr(at, '\n', size_t(end - at)));
        plan.cuts.push_back(stop ? stop + 1 : end);
    }
    plan.cuts.push_back(end);
    plan.first.assign(size_t(parts) + 1, 0);
    parallel(parts, parts, [&](int64_t k) {
        plan.first[size_t(k) + 1] = count_lines(plan.cuts[size_t(k)], plan.cuts[size_t(k) + 1]);
    });
    for (int64_t k = 0; k < parts; ++k) plan.first[size_t(k) + 1] += plan.first[size_t(k)];
    return plan;
}

// parse_csv_lines over the parts on their threads; false where a part refused its lines.
bool parse_csv(const CsvParts& plan, int n_fields, const std::vector<int>& slot, const std::vector<double*>& out) {
    const int64_t parts = int64_t(plan.cuts.size()) - 1, lines = plan.first.back();
    std::atomic<bool> refused{false};
    parallel(parts, parts, [&](int64_t k) {
        const int64_t rows = parse_csv_lines(plan.cuts[size_t(k)], plan.cuts[size_t(k) + 1], n_fields, slot.data(),
                                             out.data(), plan.first[size_t(k)], lines);
        if (rows != plan.first[size_t(k) + 1] - plan.first[size_t(k)]) refused.store(true);
    });
    return !refused.load();
}

const double* float64_column(const In& a, int64_t n, const char* name) {
    if (dtype_of(a) != F64 || a.ndim() != 1)
        throw std::invalid_argument(std::string("bcekit._core.score: '") + name + "' must be 1-D float64");
    if (int64_t(a.size()) != n)
        throw std::invalid_argument(std::string("bcekit._core.score: '") + name + "' has " +
                                    std::to_string(a.size()) + " elements, expected " + std::to_string(n));
    return static_cast<const double*>(a.data());
}

}  // namespace
}  // namespace bcekit

NB_MODULE(_core, m) {
    using namespace bcekit;
    m.doc() = "bcekit's CPU kernels. Use bcekit._native, not this module.";
    m.attr("CHUNK") = CHUNK;
    // kernel_api.h's codes by name, for the Python layer
    nb::dict dtypes, kinds, forms, reductions;
    dtypes["float32"] = int(F32), dtypes["float64"] = int(F64), dtypes["float16"] = int(F16);
    dtypes["bfloat16"] = int(BF16);
    kinds["bce"] = int(PROBABILITIES), kinds["logits"] = int(LOGITS);
    forms["absent"] = int(ABSENT), forms["scalar"] = int(SCALAR), forms["per_class"] = int(PER_CLASS);
    forms["per_row"] = int(PER_ROW), forms["full"] = int(FULL);
    reductions["none"] = int(REDUCE_NONE), reductions["mean"] = int(REDUCE_MEAN);
    reductions["sum"] = int(REDUCE_SUM);
    m.attr("DTYPES") = dtypes;
    m.attr("KINDS") = kinds;
    m.attr("BROADCAST_FORMS") = forms;
    m.attr("REDUCTIONS") = reductions;
    m.attr("GRAD_EPSILON") = GRAD_EPSILON;
    m.attr("ISA") = isa_name();
    // the builds of the double-double lanes this CPU runs, the one chosen last
    m.attr("DD_ISAS") = HAS_AVX512 ? nb::make_tuple("baseline", "avx2", "avx512")
                        : HAS_AVX2 ? nb::make_tuple("baseline", "avx2")
                                   : nb::make_tuple("baseline");
    m.attr("CACHE_MAX_AGE") = BufferCache::MAX_AGE;
    // float64 is computed in long double only where it has a 64-bit significand (x87); elsewhere the
    // Python layer keeps float64 on its composed double-double path.
    m.attr("EXTENDED_FLOAT64") = LDBL_MANT_DIG >= 64 && LDBL_MANT_DIG < 113;

    m.def(
        "empty",
        [](std::vector<size_t> shape, int dtype, bool torch) -> nb::object {
            size_t numel = 1;
            for (size_t d : shape) numel *= d;
            const nb::dlpack::dtype codes[] = {
                nb::dtype<float>(), nb::dtype<double>(),
                {uint8_t(nb::dlpack::dtype_code::Float), 16, 1},
                {uint8_t(nb::dlpack::dtype_code::Bfloat), 16, 1}};
            if (dtype < 0 || dtype > 3) throw std::invalid_argument("empty: bad dtype");
            const size_t itemsize = dtype == F64 ? 8 : (dtype == F32 ? 4 : 2);
            void* data = cache().get(numel * itemsize);
            nb::capsule owner(data, [](void* p) noexcept { cache().put(p); });
            if (torch)
                return nb::ndarray<nb::pytorch>(data, shape.size(), shape.data(), owner, nullptr, codes[dtype])
                    .cast();
            return nb::ndarray<nb::numpy>(data, shape.size(), shape.data(), owner, nullptr, codes[dtype]).cast();
        },
        nb::arg("shape"), nb::arg("dtype"), nb::arg("torch"),
        "An uninitialised C-contiguous array (NumPy) or CPU tensor (torch) from the buffer cache.");
    m.def("empty_cache", []() { cache().clear(); }, "Free the cached buffers.");
    m.def("_fail_thread_starts", [](int64_t count) { failing_starts.store(count); }, nb::arg("count"),
          "For tests: the next `count` thread starts fail as under a memory or thread limit.");
    m.def("cached_bytes", []() { return cache().cached(); }, "Bytes held by the buffer cache.");
    m.def("set_cache_limit", [](size_t bytes) { cache().set_limit(bytes); }, nb::arg("bytes"),
          "Most bytes the cache keeps (0: keep none).");
    m.def(
        "elementwise",
        [](const std::string& name, nb::ndarray<nb::ro, double, nb::device::cpu, nb::c_contig> in,
           nb::ndarray<double, nb::device::cpu, nb::c_contig> out, const std::string& isa) {
            if (in.size() != out.size()) throw std::invalid_argument("elementwise: sizes differ");
            const int64_t n = int64_t(in.size());
            bool found = false;
            if (isa == "baseline") {
                found = isa_baseline::elementwise(name.c_str(), in.data(), out.data(), n);
            } else if (isa == "avx2") {
#if defined(BCEKIT_HAVE_AVX2)
                if (!HAS_AVX2) throw std::invalid_argument("elementwise: this CPU has no AVX2 + FMA");
                found = isa_avx2::elementwise(name.c_str(), in.data(), out.data(), n);
#else
                throw std::invalid_argument("elementwise: built without the AVX2 kernel");
#endif
            } else {
                throw std::invalid_argument("elementwise: isa must be 'baseline' or 'avx2'");
            }
            if (!found) throw std::invalid_argument("elementwise: no function '" + name + "'");
        },
        nb::arg("name"), nb::arg("input"), nb::arg("out"), nb::arg("isa"),
        "For tests: out = f(input) for one of the kernels' vector math functions, on one ISA's build.");
    m.def(
        "run_plan",
        [](int kind, int dtype, int64_t n, int w_mode, int64_t w_inner, int p_mode, int64_t p_inner, int reduction,
           double label_smoothing, std::optional<double> ignore_index, uintptr_t x, uintptr_t y, uintptr_t w,
           uintptr_t p, uintptr_t grad_output, uintptr_t loss, uintptr_t grad_input, uintptr_t grad_target,
           double grad_scale, int threads) {
            return run_pointers(kind, dtype, n, x, y, w, w_mode, w_inner, p, p_mode, p_inner, grad_output,
                                grad_scale, loss, grad_input, grad_target, reduction, label_smoothing,
                                ignore_index, threads);
        },
        "A planned pass on raw data pointers: the plan's codes first (bcekit._native.Plan.core_args), then "
        "the call's pointers; no checks here.");
    m.def("run_raw", &run_pointers,
          "run() on raw data pointers (torch tensors: no DLPack round trip); no checks here.");
    m.def(
        "run",
        [](int kind, const In& x, const In& y, std::optional<In> w, int w_mode, int64_t w_inner,
           std::optional<In> p, int p_mode, int64_t p_inner, std::optional<In> grad_output,
           double grad_scale, std::optional<Out> loss, std::optional<Out> grad_input,
           std::optional<Out> grad_target, int reduction, double label_smoothing,
           std::optional<double> ignore_index, int threads) -> std::tuple<double, int64_t, int> {
            Args a;
            a.kind = kind;
            a.dtype = dtype_of(x);
            a.n = int64_t(x.size());
            a.x = x.data();
            a.y = operand(std::optional<In>(y), "target", a.dtype, a.n);
            if (w) {
                a.w_mode = w_mode;
                a.w_inner = w_inner;
                a.w = operand(w, "weight", a.dtype, weight_size(w_mode, a.n, w_inner));
            }
            if (p) {
                a.p_mode = p_mode;
                a.p_inner = p_inner;
                a.p = operand(p, "pos_weight", a.dtype, weight_size(p_mode, a.n, p_inner));
            }
            a.grad_output = operand(grad_output, "grad_output", a.dtype, a.n);
            a.grad_scale = grad_scale;
            a.loss = const_cast<void*>(operand(loss, "loss", a.dtype, a.n));
            a.grad_input = const_cast<void*>(operand(grad_input, "grad_input", a.dtype, a.n));
            a.grad_target = const_cast<void*>(operand(grad_target, "grad_target", a.dtype, a.n));
            return finish(a, kind, reduction, label_smoothing, ignore_index, threads);
        },
        nb::arg("kind"), nb::arg("input"), nb::arg("target"), nb::arg("weight").none(), nb::arg("w_mode"),
        nb::arg("w_inner"), nb::arg("pos_weight").none(), nb::arg("p_mode"), nb::arg("p_inner"),
        nb::arg("grad_output").none(), nb::arg("grad_scale"), nb::arg("loss").none(),
        nb::arg("grad_input").none(), nb::arg("grad_target").none(), nb::arg("reduction"),
        nb::arg("label_smoothing"), nb::arg("ignore_index").none(), nb::arg("threads"),
        "One pass over the data; returns (reduced loss or 0.0, kept elements, range flags: 1 input, 2 target).");
    m.def(
        "score",
        [](int kind, const std::vector<In>& xs, const std::vector<In>& ys, std::optional<In> w,
           std::optional<std::vector<double>> pos_weight, double label_smoothing,
           std::optional<double> ignore_index, std::optional<std::vector<Out>> losses, int threads) {
            if (kind != PROBABILITIES && kind != LOGITS) throw std::invalid_argument("bcekit._core: bad kind");
            if (xs.empty() || xs.size() != ys.size())
                throw std::invalid_argument("bcekit._core.score: one target column per prediction column");
            ScoreJob job;
            job.options.kind = kind;
            job.options.label_smoothing = label_smoothing;
            job.options.has_ignore = ignore_index.has_value();
            job.options.ignore_index = ignore_index.value_or(0.0);
            job.n = int64_t(xs[0].size());
            for (size_t i = 0; i < xs.size(); ++i) {
                job.x.push_back(float64_column(xs[i], job.n, "input"));
                job.y.push_back(float64_column(ys[i], job.n, "target"));
            }
            if (w) job.w = float64_column(*w, job.n, "weight");
            if (pos_weight) {
                if (pos_weight->size() != xs.size())
                    throw std::invalid_argument("bcekit._core.score: one pos_weight per label");
                job.pos_weight = *pos_weight;
            }
            if (losses) {
                if (losses->size() != xs.size())
                    throw std::invalid_argument("bcekit._core.score: one loss output per label");
                for (const Out& out : *losses)
                    job.loss.push_back(const_cast<double*>(float64_column(In(out), job.n, "loss")));
            }
            std::vector<LabelScore> result;
            {
                nb::gil_scoped_release release;
                result = score(job, threads);
            }
            std::vector<std::tuple<nb::bytes, int64_t, int64_t, int64_t, int64_t, int>> out;
            for (LabelScore& r : result) {
                const std::string digits = r.sum.bytes();
                out.emplace_back(nb::bytes(digits.data(), digits.size()), r.sum.pos_inf(), r.sum.neg_inf(),
                                 r.sum.nan(), r.kept, r.flags);
            }
            return out;
        },
        nb::arg("kind"), nb::arg("inputs"), nb::arg("targets"), nb::arg("weight").none(),
        nb::arg("pos_weight").none(), nb::arg("label_smoothing"), nb::arg("ignore_index").none(),
        nb::arg("losses").none(), nb::arg("threads"),
        "bcekit score's pass over one batch of float64 columns (one input and one target per label, a weight "
        "per row): per label (exact sum as little-endian two's-complement bytes in units of 2^-1074, +inf "
        "count, -inf count, NaN count, kept elements, check flags: 1 prediction, 2 target, 4 weight).");
    m.def(
        "losses64",
        [](int kind, const In& x, const In& y, std::optional<In> w, std::optional<In> p, double label_smoothing,
           std::optional<double> ignore_index, Out loss, const std::string& isa) -> int64_t {
            LossBlock b;
            b.kind = kind;
            b.n = int64_t(x.size());
            b.x = float64_column(x, b.n, "input");
            b.y = float64_column(y, b.n, "target");
            b.w = w ? float64_column(*w, b.n, "weight") : nullptr;
            b.p = p ? float64_column(*p, b.n, "pos_weight") : nullptr;
            b.label_smoothing = label_smoothing;
            b.has_ignore = ignore_index.has_value();
            b.ignore_index = ignore_index.value_or(0.0);
            double* out = const_cast<double*>(float64_column(In(loss), b.n, "loss"));
            std::vector<uint8_t> slow(size_t(b.n));
            return exact_losses64(select_dd(isa).losses64, b, out, slow.data());
        },
        nb::arg("kind"), nb::arg("input"), nb::arg("target"), nb::arg("weight").none(), nb::arg("pos_weight").none(),
        nb::arg("label_smoothing"), nb::arg("ignore_index").none(), nb::arg("loss"), nb::arg("isa"),
        "For tests: the float64 losses of bcekit score's double-double lanes (one ISA's build), element by "
        "element, with the elements they leave to long double computed there; returns how many those were.");
    m.def(
        "parse_csv",
        [](nb::ndarray<nb::ro, uint8_t, nb::ndim<1>, nb::device::cpu, nb::c_contig> data, int n_fields,
           std::vector<int> slot, int columns, int threads) -> nb::object {
            if (int(slot.size()) != n_fields) throw std::invalid_argument("parse_csv: one slot per field");
            for (int s : slot)
                if (s >= columns) throw std::invalid_argument("parse_csv: a slot beyond the columns");
            const char* bytes = reinterpret_cast<const char*>(data.data());
            const size_t size = data.size();
            CsvParts plan;
            {
                nb::gil_scoped_release release;
                plan = cut_csv(bytes, size, threads);
            }
            const int64_t lines = plan.first.back();
            const size_t shape[2] = {size_t(columns), size_t(lines)};
            void* buffer = cache().get(std::max<size_t>(1, size_t(columns) * size_t(lines)) * sizeof(double));
            nb::capsule owner(buffer, [](void* p) noexcept { cache().put(p); });
            std::vector<double*> rows;
            for (int c = 0; c < columns; ++c) rows.push_back(static_cast<double*>(buffer) + int64_t(c) * lines);
            bool parsed;
            {
                nb::gil_scoped_release release;
                parsed = parse_csv(plan, n_fields, slot, rows);
            }
            if (!parsed) return nb::none();
            return nb::ndarray<nb::numpy, double, nb::ndim<2>>(buffer, 2, shape, owner).cast();
        },
        nb::arg("data"), nb::arg("n_fields"), nb::arg("slot"), nb::arg("columns"), nb::arg("threads"),
        "Plain numeric CSV lines (a uint8 array of whole lines) as a (columns, lines) float64 array: field f's "
        "numbers in row slot[f] (slot[f] < 0: not read); None where a line is not read exactly as pyarrow "
        "reads it (see csv_numbers.cpp).");
}
