// Float32 matmul for XLA:CPU as an FFI custom call: out = op(a) @ op(b), op = identity or
// transpose, computed by a cblas_sgemm (single-threaded, e.g. MKL's sequential layer) on blocks
// of the output shared out over XLA's intra-op thread pool.
//
// Built and loaded by crossformer_jax/cpu_matmul.py, which also hands over the cblas_sgemm
// function pointer (crossformer_set_sgemm) before the handler is registered.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

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
                  ffi::ResultBuffer<ffi::F32> out, bool transpose_a, bool transpose_b) {
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
  const int64_t m = transpose_a ? a_dims[1] : a_dims[0];
  const int64_t k = transpose_a ? a_dims[0] : a_dims[1];
  const int64_t kb = transpose_b ? b_dims[1] : b_dims[0];
  const int64_t n = transpose_b ? b_dims[0] : b_dims[1];
  if (k != kb || out_dims[0] != m || out_dims[1] != n) {
    return ffi::Error::InvalidArgument("crossformer matmul: operand shapes do not match");
  }
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* out_data = out->typed_data();
  const int lda = static_cast<int>(a_dims[1]);
  const int ldb = static_cast<int>(b_dims[1]);
  const int trans_a = transpose_a ? kTrans : kNoTrans;
  const int trans_b = transpose_b ? kTrans : kNoTrans;
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(out_data, out_data + m * n, 0.0f);
    return ffi::Error::Success();
  }

  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  auto blocks = std::make_shared<Blocks>();
  std::vector<float> partials;
  std::function<void(int64_t, int64_t)> run_block;
  if (k >= 8 * std::max(m, n) && std::min(threads, k / kMinBlock) > 1) {
    // A long contraction (a kernel gradient over all tokens): each block contracts a slice of k
    // into its own (m, n) partial product (block 0 into out), summed at the end.
    blocks->count = std::min(threads, k / kMinBlock);
    blocks->size = (k + blocks->count - 1) / blocks->count;
    partials.resize((blocks->count - 1) * m * n);
    float* partial_data = partials.data();
    run_block = [=](int64_t begin, int64_t end) {
      end = std::min(end, k);
      const int64_t index = begin / blocks->size;
      float* dest = index == 0 ? out_data : partial_data + (index - 1) * m * n;
      const float* a_block = a_data + (transpose_a ? begin * lda : begin);
      const float* b_block = b_data + (transpose_b ? begin : begin * ldb);
      gemm(kRowMajor, trans_a, trans_b, static_cast<int>(m), static_cast<int>(n),
           static_cast<int>(end - begin), 1.0f, a_block, lda, b_block, ldb, 0.0f, dest,
           static_cast<int>(n));
    };
  } else {
    // Blocks of output rows when there are more rows than columns, else of columns.
    const bool split_rows = m >= n;
    const int64_t extent = split_rows ? m : n;
    blocks->count = std::clamp<int64_t>(extent / kMinBlock, 1, 4 * threads);
    blocks->size = (extent + blocks->count - 1) / blocks->count;
    blocks->count = (extent + blocks->size - 1) / blocks->size;
    run_block = [=](int64_t begin, int64_t end) {
      end = std::min(end, extent);
      const int rows = static_cast<int>(split_rows ? end - begin : m);
      const int cols = static_cast<int>(split_rows ? n : end - begin);
      const float* a_block = a_data;
      const float* b_block = b_data;
      float* out_block = out_data;
      if (split_rows) {
        a_block += transpose_a ? begin : begin * lda;
        out_block += begin * n;
      } else {
        b_block += transpose_b ? begin * ldb : begin;
        out_block += begin;
      }
      gemm(kRowMajor, trans_a, trans_b, rows, cols, static_cast<int>(k), 1.0f, a_block, lda,
           b_block, ldb, 0.0f, out_block, static_cast<int>(n));
    };
  }

  // Helpers take blocks from the same counter; the calling thread works too and then waits for
  // the blocks that helpers started. A helper that starts after all blocks are taken returns.
  const int64_t helpers = std::min(threads, blocks->count) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([blocks, run_block] { RunBlocks(*blocks, run_block); });
  }
  RunBlocks(*blocks, run_block);
  std::unique_lock<std::mutex> lock(blocks->mutex);
  blocks->finished.wait(lock, [&] { return blocks->done.load() == blocks->count; });
  for (size_t i = 0; i < partials.size(); ++i) out_data[i % (m * n)] += partials[i];
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
