// Float32 matmul for XLA:CPU as an FFI custom call: out (M, N) = a (M, K) @ b (K, N), computed by
// a cblas_sgemm (single-threaded, e.g. MKL's sequential layer) on blocks of output rows (or
// columns, when there are more) shared out over XLA's intra-op thread pool.
//
// Built and loaded by crossformer_jax/cpu_matmul.py, which also hands over the cblas_sgemm
// function pointer (crossformer_set_sgemm) before the handler is registered.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;

using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);

std::atomic<Sgemm> sgemm{nullptr};

// Output blocks of at least this many rows (or columns) per task: smaller blocks lose more to
// packing and scheduling than the second thread gains.
constexpr int64_t kMinBlock = 64;

struct Blocks {
  int64_t count;
  int64_t size;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
};

// Runs blocks until none are left; the caller of the last one wakes the waiting thread.
template <typename F>
void RunBlocks(Blocks& blocks, const F& run_block) {
  for (int64_t i = blocks.next.fetch_add(1); i < blocks.count; i = blocks.next.fetch_add(1)) {
    run_block(i * blocks.size, (i + 1) * blocks.size);
    if (blocks.done.fetch_add(1) + 1 == blocks.count) {
      std::lock_guard<std::mutex> lock(blocks.mutex);
      blocks.finished.notify_all();
    }
  }
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> out) {
  Sgemm gemm = sgemm.load();
  if (gemm == nullptr) {
    return ffi::Error::Internal("crossformer matmul: no cblas_sgemm was set");
  }
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  auto out_dims = out->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || out_dims.size() != 2) {
    return ffi::Error::InvalidArgument("crossformer matmul: operands must be 2-D");
  }
  const int64_t m = a_dims[0];
  const int64_t k = a_dims[1];
  const int64_t n = b_dims[1];
  if (b_dims[0] != k || out_dims[0] != m || out_dims[1] != n) {
    return ffi::Error::InvalidArgument("crossformer matmul: operand shapes do not match");
  }
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* out_data = out->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(out_data, out_data + m * n, 0.0f);
    return ffi::Error::Success();
  }

  // Blocks of output rows when there are more rows than columns, else of columns.
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  auto blocks = std::make_shared<Blocks>();
  blocks->count = std::clamp<int64_t>(extent / kMinBlock, 1, 4 * threads);
  blocks->size = (extent + blocks->count - 1) / blocks->count;
  blocks->count = (extent + blocks->size - 1) / blocks->size;
  auto run_block = [=](int64_t begin, int64_t end) {
    end = std::min(end, extent);
    const int rows = static_cast<int>(split_rows ? end - begin : m);
    const int cols = static_cast<int>(split_rows ? n : end - begin);
    const float* a_block = split_rows ? a_data + begin * k : a_data;
    const float* b_block = split_rows ? b_data : b_data + begin;
    float* out_block = out_data + (split_rows ? begin * n : begin);
    gemm(kRowMajor, kNoTrans, kNoTrans, rows, cols, static_cast<int>(k), 1.0f, a_block,
         static_cast<int>(k), b_block, static_cast<int>(n), 0.0f, out_block, static_cast<int>(n));
  };

  // Helpers take blocks from the same counter; the calling thread works too and then waits for
  // the blocks that helpers started. A helper that starts after all blocks are taken returns.
  const int64_t helpers = std::min(threads, blocks->count) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([blocks, run_block] { RunBlocks(*blocks, run_block); });
  }
  RunBlocks(*blocks, run_block);
  std::unique_lock<std::mutex> lock(blocks->mutex);
  blocks->finished.wait(lock, [&] { return blocks->done.load() == blocks->count; });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void crossformer_set_sgemm(void* function) {
  sgemm.store(reinterpret_cast<Sgemm>(function));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
