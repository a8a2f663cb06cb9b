// CrossFormer's float32 kernels for XLA:CPU as FFI custom calls, on top of MKL's sequential
// cblas_sgemm and vsExp, with the work shared out over XLA's intra-op thread pool:
//
// - CrossformerMatmul: out (M, N) = a (M, K) @ b (K, N), on blocks of output rows (or columns,
//   when there are more).
// - CrossformerAttentionForward / CrossformerAttentionBackward: softmax attention inside groups of
//   T tokens, one (group, head) pair at a time, so that the (T, T) logits of a pair stay in cache
//   from the first product to the second; the forward pass reads q, k and v straight from the qkv
//   layer's output (B, T, 3, heads, head_dim) and writes (B, T, heads, head_dim), so no transposes
//   to head-major operands are needed either way.
// - CrossformerLayerNormForward / CrossformerLayerNormBackward: LayerNorm over rows, one pass each.
// - CrossformerConvForward / CrossformerConvKernelGradient: a strided, zero-padded convolution
//   and its kernel gradient, as products over tiles of gathered patches.
//
// Built and loaded by crossformer_jax/cpu_kernels.py, which also hands over MKL's functions
// (crossformer_set_mkl) before the handlers are registered.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
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
using Vexp = void (*)(int n, const float* x, float* y);

std::atomic<Sgemm> sgemm{nullptr};
std::atomic<Vexp> vexp{nullptr};

// Output blocks of at least this many rows (or columns) per matmul task: smaller blocks lose more
// to packing and scheduling than the second thread gains.
constexpr int64_t kMinBlock = 64;

// Logits more than this far below their row's maximum are raised to it before the exponential:
// below it exp() gives denormals, which make MKL's exponential and the products that read the
// probabilities several times slower. The probabilities this changes are below 2e-38.
constexpr float kMinExponent = -87.0f;

struct Tasks {
  int64_t count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
};

// Runs tasks until none are left; the caller of the last one wakes the waiting thread.
template <typename F>
void RunTasks(Tasks& tasks, const F& run_task) {
  for (int64_t i = tasks.next.fetch_add(1); i < tasks.count; i = tasks.next.fetch_add(1)) {
    run_task(i);
    if (tasks.done.fetch_add(1) + 1 == tasks.count) {
      std::lock_guard<std::mutex> lock(tasks.mutex);
      tasks.finished.notify_all();
    }
  }
}

// Runs run_task(0 .. count-1) on the calling thread and pool helpers, and returns when all are
// done. Helpers take tasks from the same counter; one that starts after all are taken returns.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, const F& run_task) {
  auto tasks = std::make_shared<Tasks>();
  tasks->count = count;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([tasks, run_task] { RunTasks(*tasks, run_task); });
  }
  RunTasks(*tasks, run_task);
  std::unique_lock<std::mutex> lock(tasks->mutex);
  tasks->finished.wait(lock, [&] { return tasks->done.load() == tasks->count; });
}

int64_t TaskCount(ffi::ThreadPool& pool, int64_t work) {
  return std::clamp<int64_t>(work, 1, 4 * std::max<int64_t>(pool.num_threads(), 1));
}

// `total` items cut into `count` contiguous ranges [begin(task), end(task)) of per_task items
// (the last may be shorter).
struct TaskRanges {
  int64_t total, per_task, count;
  int64_t begin(int64_t task) const { return task * per_task; }
  int64_t end(int64_t task) const { return std::min(total, (task + 1) * per_task); }
};

// Ranges of `total` items for at most max_tasks tasks.
TaskRanges SplitRanges(int64_t total, int64_t max_tasks) {
  const int64_t per_task =
      std::max<int64_t>((total + max_tasks - 1) / std::max<int64_t>(max_tasks, 1), 1);
  return {total, per_task, (total + per_task - 1) / per_task};
}

// out (size) = the sum of per-task partial sums partials (count, size), added in task order, so
// the result is the same in every run with the same thread count.
void SumPartials(const float* partials, int64_t count, int64_t size, float* out) {
  std::fill(out, out + size, 0.0f);
  for (int64_t task = 0; task < count; ++task) {
    for (int64_t i = 0; i < size; ++i) out[i] += partials[task * size + i];
  }
}

template <typename B>
int64_t Count(const B& buffer) {
  return static_cast<int64_t>(buffer.element_count());
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("crossformer " + message);
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> out) {
  Sgemm gemm = sgemm.load();
  if (gemm == nullptr) return ffi::Error::Internal("crossformer matmul: MKL was not set");
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  auto out_dims = out->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || out_dims.size() != 2) {
    return Invalid("matmul: operands must be 2-D");
  }
  const int64_t m = a_dims[0];
  const int64_t k = a_dims[1];
  const int64_t n = b_dims[1];
  if (b_dims[0] != k || out_dims[0] != m || out_dims[1] != n) {
    return Invalid("matmul: operand shapes do not match");
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
  const TaskRanges blocks = SplitRanges(extent, TaskCount(pool, extent / kMinBlock));
  ParallelFor(pool, blocks.count, [=](int64_t block) {
    const int64_t begin = blocks.begin(block), end = blocks.end(block);
    const int rows = static_cast<int>(split_rows ? end - begin : m);
    const int cols = static_cast<int>(split_rows ? n : end - begin);
    const float* a_block = split_rows ? a_data + begin * k : a_data;
    const float* b_block = split_rows ? b_data : b_data + begin;
    float* out_block = out_data + (split_rows ? begin * n : begin);
    gemm(kRowMajor, kNoTrans, kNoTrans, rows, cols, static_cast<int>(k), 1.0f, a_block,
         static_cast<int>(k), b_block, static_cast<int>(n), 0.0f, out_block, static_cast<int>(n));
  });
  return ffi::Error::Success();
}

// Sizes of a group attention call; B groups of T tokens, C channels in `heads` heads of `dim`.
struct AttentionShape {
  int64_t groups, tokens, channels, heads, dim, key_bias_groups;
  bool dropout;
};

// Checks the operands' shapes against qkv (B, T, 3C): position_bias (heads, T, T), key_bias
// (G, T) with G dividing B, keep (B, heads, T, T) or empty, probs (B, heads, T, T) or empty.
ffi::Error CheckAttention(ffi::Span<const int64_t> qkv, ffi::Span<const int64_t> position_bias,
                          ffi::Span<const int64_t> key_bias, ffi::Span<const int64_t> keep,
                          int64_t heads, AttentionShape& shape) {
  if (qkv.size() != 3 || qkv[2] % 3 != 0 || heads <= 0 || (qkv[2] / 3) % heads != 0) {
    return Invalid("attention: qkv must be (B, T, 3C) with C divisible by the heads");
  }
  shape = {qkv[0], qkv[1], qkv[2] / 3, heads, qkv[2] / 3 / heads, 0, false};
  const int64_t t = shape.tokens;
  if (position_bias.size() != 3 || position_bias[0] != heads || position_bias[1] != t ||
      position_bias[2] != t) {
    return Invalid("attention: position_bias must be (heads, T, T)");
  }
  if (key_bias.size() != 2 || key_bias[1] != t || key_bias[0] <= 0 ||
      shape.groups % key_bias[0] != 0) {
    return Invalid("attention: key_bias must be (G, T) with G dividing B");
  }
  shape.key_bias_groups = key_bias[0];
  int64_t keep_size = 1;
  for (int64_t d : keep) keep_size *= d;
  shape.dropout = keep_size != 0;
  if (shape.dropout && (keep.size() != 4 || keep[0] != shape.groups || keep[1] != heads ||
                        keep[2] != t || keep[3] != t)) {
    return Invalid("attention: keep must be (B, heads, T, T) or empty");
  }
  return ffi::Error::Success();
}

bool IsProbsShape(ffi::Span<const int64_t> probs, const AttentionShape& s) {
  return probs.size() == 4 && probs[0] == s.groups && probs[1] == s.heads &&
         probs[2] == s.tokens && probs[3] == s.tokens;
}

// out (B, T, C) = softmax(scale q k^T + position_bias + key_bias) (* keep) @ v, per group and head,
// with q, k, v the three thirds of qkv (B, T, 3C); probs (B, heads, T, T) receives the softmax
// (before keep) unless it is empty.
ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                            ffi::Buffer<ffi::F32> position_bias, ffi::Buffer<ffi::F32> key_bias,
                            ffi::Buffer<ffi::F32> keep, float scale, int64_t heads,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> probs) {
  Sgemm gemm = sgemm.load();
  Vexp exp = vexp.load();
  if (gemm == nullptr || exp == nullptr) {
    return ffi::Error::Internal("crossformer attention: MKL was not set");
  }
  AttentionShape s;
  if (ffi::Error error = CheckAttention(qkv.dimensions(), position_bias.dimensions(),
                                        key_bias.dimensions(), keep.dimensions(), heads, s);
      error.failure()) {
    return error;
  }
  const bool save_probs = probs->element_count() != 0;
  auto out_dims = out->dimensions();
  if (out_dims.size() != 3 || out_dims[0] != s.groups || out_dims[1] != s.tokens ||
      out_dims[2] != s.channels || (save_probs && !IsProbsShape(probs->dimensions(), s))) {
    return Invalid("attention: results must be out (B, T, C) and probs (B, heads, T, T)");
  }
  const int64_t t = s.tokens, c = s.channels, dim = s.dim, tt = t * t;
  const float* qkv_data = qkv.typed_data();
  const float* bias_data = position_bias.typed_data();
  const float* key_bias_data = key_bias.typed_data();
  const float* keep_data = keep.typed_data();
  float* out_data = out->typed_data();
  float* probs_data = probs->typed_data();
  // Ranges of the B * heads (group, head) pairs.
  const TaskRanges pairs = SplitRanges(s.groups * heads, TaskCount(pool, s.groups * heads));
  ParallelFor(pool, pairs.count, [=](int64_t task) {
    std::vector<float> scratch((save_probs ? 0 : tt) + (s.dropout ? tt : 0));
    for (int64_t pair = pairs.begin(task); pair < pairs.end(task); ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      const float* q = qkv_data + b * t * 3 * c + h * dim;
      const float* k = q + c;
      const float* v = q + 2 * c;
      float* p = save_probs ? probs_data + pair * tt : scratch.data();
      gemm(kRowMajor, kNoTrans, kTrans, t, t, dim, scale, q, 3 * c, k, 3 * c, 0.0f, p, t);
      const float* bias = bias_data + h * tt;
      const float* key = key_bias_data + (b % s.key_bias_groups) * t;
      for (int64_t i = 0; i < t; ++i) {
        float* row = p + i * t;
        float top = row[0] + bias[i * t] + key[0];
        for (int64_t j = 0; j < t; ++j) {
          row[j] += bias[i * t + j] + key[j];
          top = std::max(top, row[j]);
        }
        for (int64_t j = 0; j < t; ++j) row[j] = std::max(row[j] - top, kMinExponent);
      }
      exp(static_cast<int>(tt), p, p);
      for (int64_t i = 0; i < t; ++i) {
        float* row = p + i * t;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < t; ++j) sum += row[j];
        const float inverse = 1.0f / sum;
        for (int64_t j = 0; j < t; ++j) row[j] *= inverse;
      }
      const float* weights = p;
      if (s.dropout) {
        float* dropped = scratch.data() + (save_probs ? 0 : tt);
        const float* multiplier = keep_data + pair * tt;
        for (int64_t i = 0; i < tt; ++i) dropped[i] = p[i] * multiplier[i];
        weights = dropped;
      }
      gemm(kRowMajor, kNoTrans, kNoTrans, t, dim, t, 1.0f, weights, t, v, 3 * c, 0.0f,
           out_data + b * t * c + h * dim, c);
    }
  });
  return ffi::Error::Success();
}

// The gradients of AttentionForward from its saved probs: d_qkv (B, T, 3C) and d_position_bias
// (heads, T, T), the logits' gradient summed over groups (per task, then over tasks in order, so
// the sum is the same in every run with the same thread count).
ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                             ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> keep,
                             ffi::Buffer<ffi::F32> grad, float scale, int64_t heads,
                             ffi::ResultBuffer<ffi::F32> d_qkv,
                             ffi::ResultBuffer<ffi::F32> d_position_bias) {
  Sgemm gemm = sgemm.load();
  if (gemm == nullptr) return ffi::Error::Internal("crossformer attention: MKL was not set");
  AttentionShape s;
  auto qkv_dims = qkv.dimensions();
  const int64_t t = qkv_dims.size() == 3 ? qkv_dims[1] : 0;
  const int64_t bias_dims[3] = {heads, t, t};
  const int64_t key_bias_dims[2] = {1, t};
  if (ffi::Error error = CheckAttention(qkv_dims, {bias_dims, 3}, {key_bias_dims, 2},
                                        keep.dimensions(), heads, s);
      error.failure()) {
    return error;
  }
  auto grad_dims = grad.dimensions();
  if (!IsProbsShape(probs.dimensions(), s) || grad_dims.size() != 3 ||
      grad_dims[0] != s.groups || grad_dims[1] != t || grad_dims[2] != s.channels) {
    return Invalid("attention backward: probs must be (B, heads, T, T) and grad (B, T, C)");
  }
  auto d_bias_dims = d_position_bias->dimensions();
  if (d_qkv->element_count() != qkv.element_count() || d_bias_dims.size() != 3 ||
      d_bias_dims[0] != heads || d_bias_dims[1] != t || d_bias_dims[2] != t) {
    return Invalid("attention backward: results must be (B, T, 3C) and (heads, T, T)");
  }
  const int64_t c = s.channels, dim = s.dim, tt = t * t, bias_size = heads * tt;
  const float* qkv_data = qkv.typed_data();
  const float* probs_data = probs.typed_data();
  const float* keep_data = keep.typed_data();
  const float* grad_data = grad.typed_data();
  float* d_qkv_data = d_qkv->typed_data();
  float* d_bias_data = d_position_bias->typed_data();
  // Ranges of the B * heads (group, head) pairs.
  const TaskRanges pairs = SplitRanges(s.groups * heads, TaskCount(pool, s.groups * heads));
  std::vector<float> partial_sums(pairs.count * bias_size, 0.0f);
  float* partial_data = partial_sums.data();
  ParallelFor(pool, pairs.count, [=](int64_t task) {
    std::vector<float> scratch(s.dropout ? 2 * tt : tt);
    float* d_logits = scratch.data();
    float* partial = partial_data + task * bias_size;
    for (int64_t pair = pairs.begin(task); pair < pairs.end(task); ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      const float* q = qkv_data + b * t * 3 * c + h * dim;
      const float* k = q + c;
      const float* v = q + 2 * c;
      const float* p = probs_data + pair * tt;
      const float* g = grad_data + b * t * c + h * dim;
      float* dq = d_qkv_data + b * t * 3 * c + h * dim;
      const float* weights = p;
      const float* multiplier = s.dropout ? keep_data + pair * tt : nullptr;
      if (s.dropout) {
        float* dropped = scratch.data() + tt;
        for (int64_t i = 0; i < tt; ++i) dropped[i] = p[i] * multiplier[i];
        weights = dropped;
      }
      // d_weights = g v^T; d_logits = p * (d_probs - rowsum(d_probs * p)), d_probs = d_weights
      // (* keep).
      gemm(kRowMajor, kNoTrans, kTrans, t, t, dim, 1.0f, g, c, v, 3 * c, 0.0f, d_logits, t);
      float* d_bias = partial + h * tt;
      for (int64_t i = 0; i < t; ++i) {
        float* row = d_logits + i * t;
        const float* p_row = p + i * t;
        if (s.dropout) {
          for (int64_t j = 0; j < t; ++j) row[j] *= multiplier[i * t + j];
        }
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < t; ++j) dot += row[j] * p_row[j];
        for (int64_t j = 0; j < t; ++j) {
          row[j] = p_row[j] * (row[j] - dot);
          d_bias[i * t + j] += row[j];
        }
      }
      gemm(kRowMajor, kNoTrans, kNoTrans, t, dim, t, scale, d_logits, t, k, 3 * c, 0.0f, dq,
           3 * c);
      gemm(kRowMajor, kTrans, kNoTrans, t, dim, t, scale, d_logits, t, q, 3 * c, 0.0f, dq + c,
           3 * c);
      gemm(kRowMajor, kTrans, kNoTrans, t, dim, t, 1.0f, weights, t, g, c, 0.0f, dq + 2 * c,
           3 * c);
    }
  });
  SumPartials(partial_data, pairs.count, bias_size, d_bias_data);
  return ffi::Error::Success();
}


// Rows of at least this many per LayerNorm task.
constexpr int64_t kMinRows = 256;

// y (R, C) = (x - mean) * rstd * scale + bias over each row of x (R, C), with mean (R) and
// rstd (R) = 1 / sqrt(var + eps) returned for the backward pass.
ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, float eps,
                            ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd) {
  auto dims = x.dimensions();
  if (dims.size() != 2 || Count(scale) != dims[1] || Count(bias) != dims[1] ||
      Count(*y) != Count(x) || Count(*mean) != dims[0] ||
      Count(*rstd) != dims[0]) {
    return Invalid("layer norm: x must be (R, C), scale and bias (C), results (R, C), (R), (R)");
  }
  const int64_t rows = dims[0], c = dims[1];
  if (rows == 0 || c == 0) return ffi::Error::Success();
  const float* x_data = x.typed_data();
  const float* scale_data = scale.typed_data();
  const float* bias_data = bias.typed_data();
  float* y_data = y->typed_data();
  float* mean_data = mean->typed_data();
  float* rstd_data = rstd->typed_data();
  const TaskRanges ranges = SplitRanges(rows, TaskCount(pool, rows / kMinRows));
  ParallelFor(pool, ranges.count, [=](int64_t task) {
    for (int64_t r = ranges.begin(task); r < ranges.end(task); ++r) {
      const float* row = x_data + r * c;
      float* out = y_data + r * c;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < c; ++j) sum += row[j];
      const float mu = sum / static_cast<float>(c);
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < c; ++j) squares += (row[j] - mu) * (row[j] - mu);
      const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(c) + eps);
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        out[j] = (row[j] - mu) * inverse * scale_data[j] + bias_data[j];
      }
      mean_data[r] = mu;
      rstd_data[r] = inverse;
    }
  });
  return ffi::Error::Success();
}

// The gradients of LayerNormForward: d_x (R, C), d_scale (C) and d_bias (C), the last two summed
// per task and then over tasks in order.
ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> grad,
                             ffi::ResultBuffer<ffi::F32> d_x, ffi::ResultBuffer<ffi::F32> d_scale,
                             ffi::ResultBuffer<ffi::F32> d_bias) {
  auto dims = x.dimensions();
  if (dims.size() != 2 || Count(mean) != dims[0] || Count(rstd) != dims[0] ||
      Count(scale) != dims[1] || Count(grad) != Count(x) ||
      Count(*d_x) != Count(x) || Count(*d_scale) != dims[1] ||
      Count(*d_bias) != dims[1]) {
    return Invalid("layer norm backward: operand sizes do not match x (R, C)");
  }
  const int64_t rows = dims[0], c = dims[1];
  float* d_scale_data = d_scale->typed_data();
  float* d_bias_data = d_bias->typed_data();
  std::fill(d_scale_data, d_scale_data + c, 0.0f);
  std::fill(d_bias_data, d_bias_data + c, 0.0f);
  if (rows == 0 || c == 0) return ffi::Error::Success();
  const float* x_data = x.typed_data();
  const float* mean_data = mean.typed_data();
  const float* rstd_data = rstd.typed_data();
  const float* scale_data = scale.typed_data();
  const float* grad_data = grad.typed_data();
  float* d_x_data = d_x->typed_data();
  const TaskRanges ranges = SplitRanges(rows, TaskCount(pool, rows / kMinRows));
  std::vector<float> partial_sums(ranges.count * 2 * c, 0.0f);
  float* partial_data = partial_sums.data();
  ParallelFor(pool, ranges.count, [=](int64_t task) {
    float* partial_scale = partial_data + task * 2 * c;
    float* partial_bias = partial_scale + c;
    for (int64_t r = ranges.begin(task); r < ranges.end(task); ++r) {
      const float* row = x_data + r * c;
      const float* g = grad_data + r * c;
      float* out = d_x_data + r * c;
      const float mu = mean_data[r], inverse = rstd_data[r];
      float grad_sum = 0.0f, grad_dot = 0.0f;
#pragma omp simd reduction(+ : grad_sum, grad_dot)
      for (int64_t j = 0; j < c; ++j) {
        const float x_hat = (row[j] - mu) * inverse;
        const float grad_hat = g[j] * scale_data[j];
        grad_sum += grad_hat;
        grad_dot += grad_hat * x_hat;
        partial_scale[j] += g[j] * x_hat;
        partial_bias[j] += g[j];
      }
      const float grad_mean = grad_sum / static_cast<float>(c);
      const float dot_mean = grad_dot / static_cast<float>(c);
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float x_hat = (row[j] - mu) * inverse;
        out[j] = inverse * (g[j] * scale_data[j] - grad_mean - x_hat * dot_mean);
      }
    }
  });
  std::vector<float> sums(2 * c);  // d_scale, d_bias
  SumPartials(partial_data, ranges.count, 2 * c, sums.data());
  std::copy(sums.begin(), sums.begin() + c, d_scale_data);
  std::copy(sums.begin() + c, sums.end(), d_bias_data);
  return ffi::Error::Success();
}


// A convolution of x (N, H, W, Cin) with a kernel (k, k, Cin, Cout), one stride and symmetric
// zero padding, output (N, Ho, Wo, Cout).
struct ConvShape {
  int64_t n, h, w, cin, k, stride, pad, ho, wo, cout;
  int64_t patch() const { return k * k * cin; }  // one output pixel's inputs
  int64_t pixels() const { return n * ho * wo; }
};

ffi::Error CheckConv(ffi::Span<const int64_t> x, ffi::Span<const int64_t> out, int64_t k,
                     int64_t cout, int64_t stride, int64_t pad, ConvShape& s) {
  if (x.size() != 4 || out.size() != 4 || k <= 0 || stride <= 0 || pad < 0 ||
      x[1] + 2 * pad < k || x[2] + 2 * pad < k) {
    return Invalid("conv: x must be (N, H, W, Cin) and the kernel fit the padded input");
  }
  s = {x[0], x[1], x[2], x[3], k, stride, pad, (x[1] + 2 * pad - k) / stride + 1,
       (x[2] + 2 * pad - k) / stride + 1, cout};
  if (out[0] != s.n || out[1] != s.ho || out[2] != s.wo || out[3] != cout) {
    return Invalid("conv: the output must be (N, Ho, Wo, Cout)");
  }
  return ffi::Error::Success();
}

// Output pixels per tile: the patches of one tile (pixels x k*k*Cin floats) are gathered into a
// buffer that stays in cache for the product that reads them.
constexpr int64_t kTilePixels = 128;

// out[0, size) = in[0, end - begin) at [begin, end), zeros elsewhere: a row of a gathered buffer
// whose part outside the source is zero padding.
void CopyWithZeros(const float* in, int64_t begin, int64_t end, int64_t size, float* out) {
  std::fill(out, out + begin, 0.0f);
  std::copy(in, in + (end - begin), out + begin);
  std::fill(out + end, out + size, 0.0f);
}

// Writes the patches of output pixels [first, first + count) (flattened over N, Ho, Wo) into
// patches (count, k*k*Cin): pixel (n, oh, ow) gets x[n, s*oh + kh - p, s*ow + kw - p, :] in
// (kh, kw, Cin) order, zeros outside x. Each kernel row is one contiguous copy.
void GatherPatches(const float* x, const ConvShape& s, int64_t first, int64_t count,
                   float* patches) {
  const int64_t row = s.k * s.cin;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t pixel = first + i;
    const int64_t ow = pixel % s.wo, oh = pixel / s.wo % s.ho, n = pixel / (s.wo * s.ho);
    const int64_t w0 = s.stride * ow - s.pad;
    const int64_t lo = std::clamp<int64_t>(-w0, 0, s.k);  // the valid kw are [lo, hi)
    const int64_t hi = std::clamp<int64_t>(s.w - w0, lo, s.k);
    for (int64_t kh = 0; kh < s.k; ++kh) {
      float* out = patches + i * s.patch() + kh * row;
      const int64_t ih = s.stride * oh + kh - s.pad;
      if (ih < 0 || ih >= s.h) {
        std::fill(out, out + row, 0.0f);
        continue;
      }
      const float* in = x + ((n * s.h + ih) * s.w + w0 + lo) * s.cin;
      CopyWithZeros(in, lo * s.cin, hi * s.cin, row, out);
    }
  }
}

// Convolutions with fewer output channels than this use the block products below when their
// kernel is a multiple of the stride.
constexpr int64_t kMinWideOutput = 64;

// Convolutions whose kernel is m >= 2 strides wide and that have few output channels (the 8x8,
// 16x16 and 32x32 embeddings) are computed on stride x stride blocks of the input instead of on
// gathered patches: with x' the input cut into blocks of s x s pixels (cb = s*s*Cin values each,
// starting `lead` = padding % s zero rows and columns before the input), the kernel cut alike
// into m x m blocks W'[i, j] (cb, Cout), and z = x' @ W' for every block of x' and all (i, j) at
// once, out[oh, ow] = sum over i, j of z[oh - first + i, ow - first + j][i, j] (first = padding /
// s). The products have the m*m*Cout columns of W' (768 for the 32x32 kernel with 12 outputs)
// instead of Cout: MKL runs them at 77-90 GFLOP/s a thread on an AMD EPYC, the thin patch
// products at 19-36 (benchmarks/README.md, "Thin convolutions").
struct BlockShape {
  int64_t m, lead, first, hb, wb, cb, zc;  // zc = m*m*Cout: the columns of W' and z
};

bool UsesBlocks(const ConvShape& s) {
  return s.cout < kMinWideOutput && s.k % s.stride == 0 && s.k / s.stride >= 2;
}

BlockShape Blocks(const ConvShape& s) {
  const int64_t m = s.k / s.stride, lead = s.pad % s.stride;
  return {m,
          lead,
          s.pad / s.stride,
          (s.h + lead + s.stride - 1) / s.stride,
          (s.w + lead + s.stride - 1) / s.stride,
          s.stride * s.stride * s.cin,
          m * m * s.cout};
}

// Block rows of x' per product: about kTilePixels blocks.
int64_t BlockRowsPerTile(const BlockShape& b) { return std::max<int64_t>(1, kTilePixels / b.wb); }

// Writes block rows [q0, q1) of image n of x' into blocks ((q1 - q0) * wb, cb): block (q, bw)
// holds x[n, q*s + a - lead, bw*s + c - lead, :] at (a, c), zeros outside x.
void GatherBlocks(const float* x, const ConvShape& s, const BlockShape& b, int64_t n, int64_t q0,
                  int64_t q1, float* blocks) {
  const int64_t strip = s.stride * s.cin;  // one block's row: s pixels
  for (int64_t q = q0; q < q1; ++q) {
    for (int64_t a = 0; a < s.stride; ++a) {
      const int64_t ih = q * s.stride + a - b.lead;
      for (int64_t bw = 0; bw < b.wb; ++bw) {
        float* out = blocks + ((q - q0) * b.wb + bw) * b.cb + a * strip;
        const int64_t w0 = bw * s.stride - b.lead;
        const int64_t lo = std::clamp<int64_t>(-w0, 0, s.stride);  // valid pixels [lo, hi)
        const int64_t hi = std::clamp<int64_t>(s.w - w0, lo, s.stride);
        if (ih < 0 || ih >= s.h) {
          std::fill(out, out + strip, 0.0f);
          continue;
        }
        const float* in = x + ((n * s.h + ih) * s.w + w0 + lo) * s.cin;
        CopyWithZeros(in, lo * s.cin, hi * s.cin, strip, out);
      }
    }
  }
}

// The index of kernel value (i*s + a, j*s + c, ci, co) in W' (cb, zc). The columns run over j
// backwards, so that the m column blocks (i, m-1) ... (i, 0) of a block at (q, bw) meet the output
// pixels (q + first - i, bw + first - m + 1) ... (q + first - i, bw + first), in a row and in
// order: each is one contiguous run of m*Cout values on both sides.
int64_t BlockKernelIndex(const ConvShape& s, const BlockShape& b, int64_t kh, int64_t kw,
                         int64_t ci, int64_t co) {
  const int64_t row = ((kh % s.stride) * s.stride + kw % s.stride) * s.cin + ci;
  const int64_t col = ((kh / s.stride) * b.m + (b.m - 1 - kw / s.stride)) * s.cout + co;
  return row * b.zc + col;
}

// The run of output pixels that the block in column bw reaches: [ow0 + lo, ow0 + hi) in an output
// row, from column blocks lo ... hi-1 of one kernel row i of z (ow0 = bw + first - m + 1).
struct PixelRun {
  int64_t ow0, lo, hi;
};

PixelRun RunOf(const ConvShape& s, const BlockShape& b, int64_t bw) {
  const int64_t ow0 = bw + b.first - b.m + 1;
  const int64_t lo = std::clamp<int64_t>(-ow0, 0, b.m);
  return {ow0, lo, std::clamp<int64_t>(s.wo - ow0, lo, b.m)};
}

// out = conv(x, kernel) from the blocks of x: per task one image, or a range of its output rows
// when there are fewer images than threads (the block rows at the range's edges are then
// multiplied by both neighbouring tasks).
void BlockConvForward(ffi::ThreadPool& pool, Sgemm gemm, const float* x, const float* kernel,
                      const ConvShape& s, float* out) {
  const BlockShape b = Blocks(s);
  std::vector<float> kernel_blocks(b.cb * b.zc);  // W' (cb, zc)
  for (int64_t kh = 0; kh < s.k; ++kh) {
    for (int64_t kw = 0; kw < s.k; ++kw) {
      for (int64_t ci = 0; ci < s.cin; ++ci) {
        for (int64_t co = 0; co < s.cout; ++co) {
          kernel_blocks[BlockKernelIndex(s, b, kh, kw, ci, co)] =
              kernel[((kh * s.k + kw) * s.cin + ci) * s.cout + co];
        }
      }
    }
  }
  const float* w = kernel_blocks.data();
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunks = std::clamp<int64_t>((threads + s.n - 1) / std::max<int64_t>(s.n, 1), 1,
                                             std::max<int64_t>(s.ho, 1));
  const int64_t rows_per_tile = BlockRowsPerTile(b);
  const int64_t pixel = s.cout, row = s.wo * s.cout;
  ParallelFor(pool, s.n * chunks, [=](int64_t task) {
    const int64_t n = task / chunks, chunk = task % chunks;
    const int64_t o0 = chunk * s.ho / chunks, o1 = (chunk + 1) * s.ho / chunks;
    float* image = out + n * s.ho * row;
    std::fill(image + o0 * row, image + o1 * row, 0.0f);
    // Block rows that reach output rows [o0, o1): q = oh - first + i, 0 <= i < m.
    const int64_t q_begin = std::max<int64_t>(0, o0 - b.first);
    const int64_t q_end = std::min<int64_t>(b.hb, o1 - b.first + b.m - 1);
    std::vector<float> blocks(rows_per_tile * b.wb * b.cb), z(rows_per_tile * b.wb * b.zc);
    for (int64_t q0 = q_begin; q0 < q_end; q0 += rows_per_tile) {
      const int64_t q1 = std::min(q_end, q0 + rows_per_tile);
      GatherBlocks(x, s, b, n, q0, q1, blocks.data());
      gemm(kRowMajor, kNoTrans, kNoTrans, static_cast<int>((q1 - q0) * b.wb),
           static_cast<int>(b.zc), static_cast<int>(b.cb), 1.0f, blocks.data(),
           static_cast<int>(b.cb), w, static_cast<int>(b.zc), 0.0f, z.data(),
           static_cast<int>(b.zc));
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t i = 0; i < b.m; ++i) {
          const int64_t oh = q + b.first - i;
          if (oh < o0 || oh >= o1) continue;
          for (int64_t bw = 0; bw < b.wb; ++bw) {
            const PixelRun run = RunOf(s, b, bw);
            const float* from = z.data() + ((q - q0) * b.wb + bw) * b.zc +
                                (i * b.m + run.lo) * s.cout;
            float* to = image + oh * row + (run.ow0 + run.lo) * pixel;
            const int64_t count = (run.hi - run.lo) * s.cout;
#pragma omp simd
            for (int64_t c = 0; c < count; ++c) to[c] += from[c];
          }
        }
      }
    }
  });
}

// d_kernel from the blocks of x: d_W' (cb, zc) = sum over blocks of x'^T g', g'[(q, bw), (i, j)]
// = grad[q + first - i, bw + first - j] (zeros outside grad), per task a partial sum over tiles
// of (image, block rows), then the partial sums in task order.
void BlockConvKernelGradient(ffi::ThreadPool& pool, Sgemm gemm, const float* x, const float* grad,
                             const ConvShape& s, float* d_kernel) {
  const BlockShape b = Blocks(s);
  const int64_t rows_per_tile = BlockRowsPerTile(b);
  const int64_t tiles_per_image = (b.hb + rows_per_tile - 1) / rows_per_tile;
  const int64_t size = b.cb * b.zc;
  const TaskRanges ranges =
      SplitRanges(s.n * tiles_per_image, std::max<int64_t>(pool.num_threads(), 1));
  std::vector<float> partial_sums(ranges.count * size, 0.0f);
  float* partial_data = partial_sums.data();
  ParallelFor(pool, ranges.count, [=](int64_t task) {
    std::vector<float> blocks(rows_per_tile * b.wb * b.cb), g(rows_per_tile * b.wb * b.zc);
    for (int64_t tile = ranges.begin(task); tile < ranges.end(task); ++tile) {
      const int64_t n = tile / tiles_per_image;
      const int64_t q0 = tile % tiles_per_image * rows_per_tile;
      const int64_t q1 = std::min(b.hb, q0 + rows_per_tile);
      GatherBlocks(x, s, b, n, q0, q1, blocks.data());
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t bw = 0; bw < b.wb; ++bw) {
          const PixelRun run = RunOf(s, b, bw);
          for (int64_t i = 0; i < b.m; ++i) {
            const int64_t oh = q + b.first - i;
            float* to = g.data() + ((q - q0) * b.wb + bw) * b.zc + i * b.m * s.cout;
            if (oh < 0 || oh >= s.ho) {
              std::fill(to, to + b.m * s.cout, 0.0f);
              continue;
            }
            const float* from = grad + ((n * s.ho + oh) * s.wo + run.ow0 + run.lo) * s.cout;
            CopyWithZeros(from, run.lo * s.cout, run.hi * s.cout, b.m * s.cout, to);
          }
        }
      }
      gemm(kRowMajor, kTrans, kNoTrans, static_cast<int>(b.cb), static_cast<int>(b.zc),
           static_cast<int>((q1 - q0) * b.wb), 1.0f, blocks.data(), static_cast<int>(b.cb),
           g.data(), static_cast<int>(b.zc), 1.0f, partial_data + task * size,
           static_cast<int>(b.zc));
    }
  });
  std::vector<float> d_kernel_blocks(size);
  SumPartials(partial_data, ranges.count, size, d_kernel_blocks.data());
  for (int64_t kh = 0; kh < s.k; ++kh) {
    for (int64_t kw = 0; kw < s.k; ++kw) {
      for (int64_t ci = 0; ci < s.cin; ++ci) {
        for (int64_t co = 0; co < s.cout; ++co) {
          d_kernel[((kh * s.k + kw) * s.cin + ci) * s.cout + co] =
              d_kernel_blocks[BlockKernelIndex(s, b, kh, kw, ci, co)];
        }
      }
    }
  }
}

// out = conv(x, kernel): per tile of output pixels, the gathered patches @ kernel (k*k*Cin, Cout).
ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       int64_t stride, int64_t padding, ffi::ResultBuffer<ffi::F32> out) {
  Sgemm gemm = sgemm.load();
  if (gemm == nullptr) return ffi::Error::Internal("crossformer conv: MKL was not set");
  auto k_dims = kernel.dimensions();
  if (k_dims.size() != 4 || k_dims[0] != k_dims[1] || x.dimensions().size() != 4 ||
      k_dims[2] != x.dimensions()[3]) {
    return Invalid("conv: the kernel must be (k, k, Cin, Cout)");
  }
  ConvShape s;
  if (ffi::Error error = CheckConv(x.dimensions(), out->dimensions(), k_dims[0], k_dims[3],
                                   stride, padding, s);
      error.failure()) {
    return error;
  }
  const float* x_data = x.typed_data();
  const float* kernel_data = kernel.typed_data();
  float* out_data = out->typed_data();
  if (UsesBlocks(s)) {
    BlockConvForward(pool, gemm, x_data, kernel_data, s, out_data);
    return ffi::Error::Success();
  }
  const int64_t tiles = (s.pixels() + kTilePixels - 1) / kTilePixels;
  const TaskRanges ranges = SplitRanges(tiles, TaskCount(pool, tiles));
  ParallelFor(pool, ranges.count, [=](int64_t task) {
    std::vector<float> patches(kTilePixels * s.patch());
    for (int64_t tile = ranges.begin(task); tile < ranges.end(task); ++tile) {
      const int64_t first = tile * kTilePixels;
      const int64_t pixels = std::min(kTilePixels, s.pixels() - first);
      GatherPatches(x_data, s, first, pixels, patches.data());
      gemm(kRowMajor, kNoTrans, kNoTrans, static_cast<int>(pixels), static_cast<int>(s.cout),
           static_cast<int>(s.patch()), 1.0f, patches.data(), static_cast<int>(s.patch()),
           kernel_data, static_cast<int>(s.cout), 0.0f, out_data + first * s.cout,
           static_cast<int>(s.cout));
    }
  });
  return ffi::Error::Success();
}

// d_kernel (k, k, Cin, Cout) = sum over output pixels of patch^T grad: per task a partial sum over
// its tiles (patches^T @ grad tile), then the partial sums in task order.
ffi::Error ConvKernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> grad, int64_t stride, int64_t padding,
                              ffi::ResultBuffer<ffi::F32> d_kernel) {
  Sgemm gemm = sgemm.load();
  if (gemm == nullptr) return ffi::Error::Internal("crossformer conv: MKL was not set");
  auto k_dims = d_kernel->dimensions();
  if (k_dims.size() != 4 || k_dims[0] != k_dims[1] || x.dimensions().size() != 4 ||
      k_dims[2] != x.dimensions()[3]) {
    return Invalid("conv kernel gradient: the result must be (k, k, Cin, Cout)");
  }
  ConvShape s;
  if (ffi::Error error = CheckConv(x.dimensions(), grad.dimensions(), k_dims[0], k_dims[3],
                                   stride, padding, s);
      error.failure()) {
    return error;
  }
  const float* x_data = x.typed_data();
  const float* grad_data = grad.typed_data();
  float* d_kernel_data = d_kernel->typed_data();
  if (UsesBlocks(s)) {
    BlockConvKernelGradient(pool, gemm, x_data, grad_data, s, d_kernel_data);
    return ffi::Error::Success();
  }
  const int64_t size = s.patch() * s.cout;
  const int64_t tiles = (s.pixels() + kTilePixels - 1) / kTilePixels;
  // One task per thread: each holds a whole partial kernel gradient.
  const TaskRanges ranges = SplitRanges(tiles, std::max<int64_t>(pool.num_threads(), 1));
  std::vector<float> partial_sums(ranges.count * size, 0.0f);
  float* partial_data = partial_sums.data();
  ParallelFor(pool, ranges.count, [=](int64_t task) {
    std::vector<float> patches(kTilePixels * s.patch());
    for (int64_t tile = ranges.begin(task); tile < ranges.end(task); ++tile) {
      const int64_t first = tile * kTilePixels;
      const int64_t pixels = std::min(kTilePixels, s.pixels() - first);
      GatherPatches(x_data, s, first, pixels, patches.data());
      gemm(kRowMajor, kTrans, kNoTrans, static_cast<int>(s.patch()), static_cast<int>(s.cout),
           static_cast<int>(pixels), 1.0f, patches.data(), static_cast<int>(s.patch()),
           grad_data + first * s.cout, static_cast<int>(s.cout), 1.0f,
           partial_data + task * size, static_cast<int>(s.cout));
    }
  });
  SumPartials(partial_data, ranges.count, size, d_kernel_data);
  return ffi::Error::Success();
}

}  // namespace

extern "C" void crossformer_set_mkl(void* cblas_sgemm, void* vs_exp) {
  sgemm.store(reinterpret_cast<Sgemm>(cblas_sgemm));
  vexp.store(reinterpret_cast<Vexp>(vs_exp));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // position_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // key_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // probs

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // probs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("heads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_qkv
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_position_bias

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>());  // rstd

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_x
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_scale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_bias

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrossformerConvKernelGradient, ConvKernelGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_kernel
