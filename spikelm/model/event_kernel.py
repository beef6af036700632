"""The CPU kernels of inference: event-driven synapses, the adaptive neuron's rule and the RWKV-6 recurrence
(docs/design.md, "Event-driven decoding", its paragraphs on the kernel and on CPU inference kernels).

``event_linear(spikes [S, B, in], tables)`` computes, for each of S sites, ``spikes[s] @ tables[s]`` where
``tables[s] [in, out_s]`` is an input-major weight (``Synapses.weight.t()``), reading only the rows of inputs that
fired in at least one of the B rows: each such row is read once from memory and applied to every batch row that
fired it, accumulated in fp32 in input order. One call serves several sites (a mix's stacked inputs), so a
decoding step pays one dispatch per stack instead of a handful of small ops per site.

The kernel is a small C++ extension built on first use with ``torch.utils.cpp_extension.load_inline`` (about a
minute, cached in ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Without a C++ compiler, or with
``SPIKELM_EVENT_KERNEL=0``, the same result comes from ``F.embedding_bag`` per site (weighted rows, one bag per
batch row): slower, never different beyond float summation order.

Two more entry points serve CPU inference calls of any length (prompts, and one-token steps through the modules):
``adaptive_fire`` (the adaptive neuron's threshold and rule in one call, its torch values bit for bit) and
``wkv6_sequence`` (the RWKV-6 recurrence token by token with the state in cache, in place of the chunked torch
scan; ``rwkv6_block_step`` runs the same routine). Each returns ``None`` without the extension, and the caller then
runs its torch ops.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <vector>
#include <cmath>
#include <algorithm>
#ifdef __AVX2__
#include <immintrin.h>
#endif

template <typename T>
static void accumulate(const float* __restrict__ x, int64_t batch, int64_t in, const T* __restrict__ table,
                       int64_t out, float* __restrict__ acc, const std::vector<int64_t>& active) {
  // Columns in blocks over threads; each active input row is read once per block and used by every batch row.
  // Rows are summed GROUP at a time (each batch row's target read and written once per group) while the next
  // group's rows are prefetched: the rows sit at scattered addresses, and several rows in flight at once keep more
  // memory requests outstanding than one row's stream does (measured at 216m's shapes: -13% gather time against
  // one row at a time with the next one prefetched).
  constexpr int64_t line = 64 / sizeof(T);
  constexpr int64_t GROUP = 8;
  auto body = [&](int64_t c0, int64_t c1) {
    const int64_t n = static_cast<int64_t>(active.size());
    const T* rows[GROUP];
    float v[GROUP];
    for (int64_t j = 0; j < n; j += GROUP) {
      const int64_t g = std::min(GROUP, n - j);
      for (int64_t d = j + GROUP; d < std::min(j + 2 * GROUP, n); ++d) {
        const T* next = table + active[d] * out;
        for (int64_t c = c0; c < c1; c += line) __builtin_prefetch(next + c, 0, 0);
      }
      for (int64_t d = 0; d < g; ++d) rows[d] = table + active[j + d] * out;
      for (int64_t b = 0; b < batch; ++b) {
        bool any = false;
        for (int64_t d = 0; d < g; ++d) {
          v[d] = x[b * in + active[j + d]];
          any = any || v[d] != 0.0f;
        }
        if (!any) continue;
        float* __restrict__ target = acc + b * out;
        if (g == GROUP) {
          const T *__restrict__ r0 = rows[0], *__restrict__ r1 = rows[1], *__restrict__ r2 = rows[2];
          const T *__restrict__ r3 = rows[3], *__restrict__ r4 = rows[4], *__restrict__ r5 = rows[5];
          const T *__restrict__ r6 = rows[6], *__restrict__ r7 = rows[7];
          for (int64_t c = c0; c < c1; ++c) {
            target[c] += ((v[0] * static_cast<float>(r0[c]) + v[1] * static_cast<float>(r1[c])) +
                          (v[2] * static_cast<float>(r2[c]) + v[3] * static_cast<float>(r3[c]))) +
                         ((v[4] * static_cast<float>(r4[c]) + v[5] * static_cast<float>(r5[c])) +
                          (v[6] * static_cast<float>(r6[c]) + v[7] * static_cast<float>(r7[c])));
          }
        } else {
          for (int64_t d = 0; d < g; ++d) {
            if (v[d] == 0.0f) continue;
            const T* __restrict__ row = rows[d];
            for (int64_t c = c0; c < c1; ++c) target[c] += v[d] * static_cast<float>(row[c]);
          }
        }
      }
    }
  };
  const int64_t work = static_cast<int64_t>(active.size()) * out;
  if (work >= (int64_t(1) << 16)) {
    at::parallel_for(0, out, 256, body);
  } else {
    body(0, out);
  }
}

std::vector<torch::Tensor> accumulate_sites(const float* all, int64_t sites, int64_t batch, int64_t in,
                                            const std::vector<torch::Tensor>& tables,
                                            const torch::TensorOptions& options) {
  TORCH_CHECK(static_cast<int64_t>(tables.size()) == sites, "event_linear: one table per site");
  std::vector<torch::Tensor> outs;
  std::vector<int64_t> active;
  active.reserve(in);
  for (int64_t s = 0; s < sites; ++s) {
    const torch::Tensor& table = tables[s];
    TORCH_CHECK(table.dim() == 2 && table.size(0) == in && table.is_contiguous() && table.device().is_cpu(),
                "event_linear: each table must be a contiguous CPU tensor [in, out]");
    const int64_t out = table.size(1);
    const float* x = all + s * batch * in;
    active.clear();
    for (int64_t i = 0; i < in; ++i) {
      for (int64_t b = 0; b < batch; ++b) {
        if (x[b * in + i] != 0.0f) { active.push_back(i); break; }
      }
    }
    torch::Tensor acc = torch::zeros({batch, out}, options);
    float* a = acc.data_ptr<float>();
    if (table.scalar_type() == torch::kFloat) {
      accumulate<float>(x, batch, in, table.data_ptr<float>(), out, a, active);
      outs.push_back(acc);
    } else if (table.scalar_type() == torch::kBFloat16) {
      accumulate<c10::BFloat16>(x, batch, in, table.data_ptr<c10::BFloat16>(), out, a, active);
      outs.push_back(acc.to(torch::kBFloat16));
    } else {
      TORCH_CHECK(false, "event_linear: tables must be float32 or bfloat16");
    }
  }
  return outs;
}

// The adaptive neuron's inference rule (neurons.AdaptiveNeuron, the same fp32 operations in the same order, so the
// same values bit for bit) on one row of `in` values with V_th = t. With AVX2, 8 values at a time with the same
// instructions' IEEE results (division, round half to even, min/max, compare).
static inline void quantize_row(const float* __restrict__ xr, float* __restrict__ yr, int64_t in, float t,
                                int64_t resolution, float m) {
  // resolution 1: counts = clamp(round(x / V_th), -m, m); y = counts * V_th (no silent set beyond round's).
  // resolution r: step = V_th / r; counts = clamp(round(x / step), -m, m), 0 where |x| < V_th / 2.
  const float step = resolution == 1 ? t : t / static_cast<float>(resolution);
  const float half = resolution == 1 ? 0.0f : t / 2.0f;
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 vstep = _mm256_set1_ps(step), vhalf = _mm256_set1_ps(half);
  const __m256 vmax = _mm256_set1_ps(m), vmin = _mm256_set1_ps(-m), sign = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= in; i += 8) {
    const __m256 xv = _mm256_loadu_ps(xr + i);
    __m256 c = _mm256_round_ps(_mm256_div_ps(xv, vstep), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    c = _mm256_min_ps(_mm256_max_ps(c, vmin), vmax);
    c = _mm256_andnot_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, xv), vhalf, _CMP_LT_OQ), c);  // silent: +0
    _mm256_storeu_ps(yr + i, _mm256_mul_ps(c, vstep));
  }
#endif
  for (; i < in; ++i) {
    const float c = std::min(std::max(std::nearbyint(xr[i] / step), -m), m);
    yr[i] = (std::fabs(xr[i]) < half ? 0.0f : c) * step;
  }
}

// The rule on `rows` rows of `in` values, V_th per row in th.
static void quantize_rows(const float* xs, const float* th, float* ys, int64_t rows, int64_t in, int64_t resolution,
                          int64_t max_spikes) {
  const float m = static_cast<float>(max_spikes);
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(in, 1)),
                   [&](int64_t row0, int64_t row1) {
    for (int64_t row = row0; row < row1; ++row) quantize_row(xs + row * in, ys + row * in, in, th[row], resolution, m);
  });
}

// V_th of a token from the sum of its |x| over C channels, in AdaptiveNeuron's fp32 operations and order:
// mean = sum * (1 / C); resolution 1: max(mean / k, eps / k); finer: max(mean, eps) / k.
static inline float threshold_of(float sum, int64_t C, double k, int64_t resolution, double eps) {
  const float mean = sum * static_cast<float>(1.0 / static_cast<double>(C));
  const float kf = static_cast<float>(k);
  return resolution == 1 ? std::max(mean / kf, static_cast<float>(eps / k))
                         : std::max(mean, static_cast<float>(eps)) / kf;
}

// The adaptive neuron's whole inference output V_th * counts (no observers) of x [N, C] float32: V_th per row as
// AdaptiveNeuron computes it, mean |x| summed in index order in float32 as torch's L1 vector norm does (the same
// values; tested against the torch path), 8 rows at a time (8 independent sums keep the adder busy where one row's
// chain of dependent additions would wait on each), then the rule on those rows while they are in cache.
torch::Tensor adaptive_fire(torch::Tensor x, double k, int64_t resolution, int64_t max_spikes, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "adaptive_fire: x must be a contiguous float32 CPU tensor [N, C]");
  const int64_t N = x.size(0), C = x.size(1);
  torch::Tensor y = torch::empty_like(x);
  const float* xs = x.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const float m = static_cast<float>(max_spikes);
  constexpr int64_t ROWS = 8;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(C * ROWS, 1));
  at::parallel_for(0, (N + ROWS - 1) / ROWS, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * ROWS, n = std::min(ROWS, N - r0);
      const float* __restrict__ block = xs + r0 * C;
      float sum[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      if (n == ROWS) {
        for (int64_t i = 0; i < C; ++i) {
          for (int64_t l = 0; l < ROWS; ++l) sum[l] += std::fabs(block[l * C + i]);
        }
      } else {
        for (int64_t l = 0; l < n; ++l) {
          for (int64_t i = 0; i < C; ++i) sum[l] += std::fabs(block[l * C + i]);
        }
      }
      for (int64_t l = 0; l < n; ++l) {
        quantize_row(block + l * C, ys + (r0 + l) * C, C, threshold_of(sum[l], C, k, resolution, eps), resolution, m);
      }
    }
  });
  return y;
}

// One token and head of the RWKV-6 recurrence for the value columns [j0, j0 + 8 N): the outputs stay in registers
// while the K state rows stream through L1 (each state value read and written once per token).
template <int N>
static inline void wkv_columns(float* __restrict__ S, int64_t K, int64_t V, int64_t j0, const float* __restrict__ rt,
                               const float* __restrict__ kt, const float* __restrict__ dt,
                               const float* __restrict__ uh, const float* __restrict__ vt, float* __restrict__ o) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[N], vv[N];
  for (int n = 0; n < N; ++n) {
    acc[n] = _mm256_setzero_ps();
    vv[n] = _mm256_loadu_ps(vt + j0 + 8 * n);
  }
  for (int64_t i = 0; i < K; ++i) {
    const __m256 ki = _mm256_set1_ps(kt[i]), ri = _mm256_set1_ps(rt[i]);
    const __m256 ui = _mm256_set1_ps(uh[i]), di = _mm256_set1_ps(dt[i]);
    float* Si = S + i * V + j0;
    for (int n = 0; n < N; ++n) {
      const __m256 s = _mm256_loadu_ps(Si + 8 * n);
      const __m256 kv = _mm256_mul_ps(ki, vv[n]);
      acc[n] = _mm256_fmadd_ps(ri, _mm256_fmadd_ps(ui, kv, s), acc[n]);
      _mm256_storeu_ps(Si + 8 * n, _mm256_fmadd_ps(di, s, kv));
    }
  }
  for (int n = 0; n < N; ++n) _mm256_storeu_ps(o + j0 + 8 * n, acc[n]);
#endif
}

// The RWKV-6 recurrence over T tokens: r, k, decay = exp(log-decay) [B, T, H, K], v [B, T, H, V] (contiguous), u
// [H, K]; S [B, H, K, V] is updated in place, o [B, T, H, V] written. Per token and head, as the naive loop:
// o_t = r_t (S + diag(u) k_t^T v_t), S = diag(decay_t) S + k_t^T v_t; the head's state stays in L1 across tokens,
// heads (and batch rows) over threads. Prompts (wkv6_sequence) and one-token steps (rwkv6_block_step, and the
// modules' one-token path through wkv6_sequence) share it, so both decoding paths compute the same values.
static void wkv6_recurrence(const float* rp, const float* kp, const float* vp, const float* dp, const float* up,
                            float* sp, float* op, int64_t B, int64_t T, int64_t H, int64_t K, int64_t V) {
#if defined(__AVX2__) && defined(__FMA__)
  const int64_t vector_columns = V / 8 * 8;
#else
  const int64_t vector_columns = 0;
#endif
  at::parallel_for(0, B * H, T > 1 ? 1 : B * H, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / H, h = p % H;
      float* __restrict__ S = sp + p * K * V;
      const float* __restrict__ uh = up + h * K;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t at = (b * T + t) * H + h;
        const float* __restrict__ rt = rp + at * K;
        const float* __restrict__ kt = kp + at * K;
        const float* __restrict__ dt = dp + at * K;
        const float* __restrict__ vt = vp + at * V;
        float* __restrict__ o = op + at * V;
        int64_t j0 = 0;
        for (; j0 + 32 <= vector_columns; j0 += 32) wkv_columns<4>(S, K, V, j0, rt, kt, dt, uh, vt, o);
        for (; j0 + 8 <= vector_columns; j0 += 8) wkv_columns<1>(S, K, V, j0, rt, kt, dt, uh, vt, o);
        if (j0 < V) {  // columns left over (all of them without AVX2)
          for (int64_t j = j0; j < V; ++j) o[j] = 0.0f;
          for (int64_t i = 0; i < K; ++i) {
            const float ki = kt[i], ri = rt[i], ui = uh[i], di = dt[i];
            float* __restrict__ Si = S + i * V;
            for (int64_t j = j0; j < V; ++j) {
              const float kv = ki * vt[j];
              o[j] += ri * (Si[j] + ui * kv);
              Si[j] = di * Si[j] + kv;
            }
          }
        }
      }
    }
  });
}

// The recurrence over a whole sequence: r, k [B, T, H, K], decay = exp(log-decay) [B, T, H, K], v [B, T, H, V]
// float32 contiguous, u [H, K], state [B, H, K, V] -> {o [B, T, H, V], final state}.
std::vector<torch::Tensor> wkv6_sequence(torch::Tensor r, torch::Tensor k, torch::Tensor v, torch::Tensor decay,
                                         torch::Tensor u, torch::Tensor state) {
  for (const torch::Tensor* t : {&r, &k, &v, &decay, &u, &state}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "wkv6_sequence: inputs must be contiguous float32 CPU tensors");
  }
  TORCH_CHECK(r.dim() == 4 && k.sizes() == r.sizes() && decay.sizes() == r.sizes() && v.dim() == 4 &&
              v.size(0) == r.size(0) && v.size(1) == r.size(1) && v.size(2) == r.size(2), "wkv6_sequence: shapes");
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), K = r.size(3), V = v.size(3);
  TORCH_CHECK(u.numel() == H * K && state.numel() == B * H * K * V, "wkv6_sequence: u [H, K], state [B, H, K, V]");
  torch::Tensor out = torch::empty({B, T, H, V}, r.options());
  torch::Tensor s = state.clone();
  wkv6_recurrence(r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), decay.data_ptr<float>(),
                  u.data_ptr<float>(), s.data_ptr<float>(), out.data_ptr<float>(), B, T, H, K, V);
  return {out, s};
}

// The adaptive rule followed by the synapses: x [S, B, in] float32, threshold [S, B] float32 (V_th per token, as
// AdaptiveNeuron.threshold computes it).
std::vector<torch::Tensor> adaptive_event_linear(torch::Tensor x, torch::Tensor threshold, int64_t resolution,
                                                 int64_t max_spikes, std::vector<torch::Tensor> tables) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "adaptive_event_linear: x must be a contiguous float32 CPU tensor [S, B, in]");
  const int64_t sites = x.size(0), batch = x.size(1), in = x.size(2);
  TORCH_CHECK(threshold.scalar_type() == torch::kFloat && threshold.is_contiguous() &&
              threshold.numel() == sites * batch, "adaptive_event_linear: threshold must be float32 [S, B]");
  torch::Tensor spikes = torch::empty_like(x);
  float* ys = spikes.data_ptr<float>();
  quantize_rows(x.data_ptr<float>(), threshold.data_ptr<float>(), ys, sites * batch, in, resolution, max_spikes);
  return accumulate_sites(ys, sites, batch, in, tables, x.options());
}

// V_th per token as AdaptiveNeuron computes it (adaptive_fire's sums and formula): x [N, C] float32 -> [N].
static torch::Tensor adaptive_threshold(const torch::Tensor& x, double k, int64_t resolution, double eps) {
  const torch::Tensor xc = x.contiguous();
  const int64_t N = xc.size(0), C = xc.size(1);
  torch::Tensor threshold = torch::empty({N}, xc.options());
  const float* xs = xc.data_ptr<float>();
  float* th = threshold.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < C; ++i) sum += std::fabs(xs[n * C + i]);
    th[n] = threshold_of(sum, C, k, resolution, eps);
  }
  return threshold;
}

static std::vector<torch::Tensor> fire(const torch::Tensor& x, double k, int64_t resolution, int64_t max_spikes,
                                       double eps, std::vector<torch::Tensor> tables) {
  const int64_t sites = x.size(0), batch = x.size(1), in = x.size(2);
  torch::Tensor threshold = adaptive_threshold(x.reshape({sites * batch, in}), k, resolution, eps);
  return adaptive_event_linear(x.contiguous(), threshold.contiguous(), resolution, max_spikes, tables);
}

static bool float_cpu(const torch::Tensor& t) {
  return t.defined() && t.scalar_type() == torch::kFloat && t.device().is_cpu();
}

// One token of a SpikeLMBlock with an RWKV-6 time mix (the model's modules' one-token path: the same ATen ops in
// the same order, the adaptive sites through adaptive_event_linear, the recurrence through wkv6_recurrence), without
// a Python call per operation. x [B, C] residual stream and the block's state (time-mix shift [B, C], wkv [B, H, K,
// K], channel-mix shift [B, C]); params: ln1 weight, bias, time-mix shift_mix [5, C], time_decay, bonus [H, K], the
// receptance, key, value, gate and decay synapses' weights [out, in] (input-major: weight.t() contiguous), decay_up
// weight, group-norm weight, bias, the output synapses' weight, ln2 weight, bias, channel-mix shift_mix [2, C], its
// key, receptance and value weights; scalars: ln1, group-norm, ln2 eps, then k per site group (time-mix inputs,
// output, channel-mix inputs, value) and the neuron eps; ints: resolution then max_spikes per group. Returns {x,
// time-mix shift, wkv, channel-mix shift}, or {} when a tensor is not float32 on CPU or a weight is not input-major
// (the caller then runs the modules).
std::vector<torch::Tensor> rwkv6_block_step(torch::Tensor x, torch::Tensor tm_shift, torch::Tensor wkv,
                                            torch::Tensor cm_shift, std::vector<torch::Tensor> params,
                                            std::vector<double> scalars, std::vector<int64_t> ints) {
  TORCH_CHECK(params.size() == 20 && scalars.size() == 8 && ints.size() == 8, "rwkv6_block_step: arguments");
  for (const torch::Tensor& t : params) {
    if (!float_cpu(t)) return {};
  }
  for (const torch::Tensor* t : {&x, &tm_shift, &wkv, &cm_shift}) {
    if (!float_cpu(*t)) return {};
  }
  std::vector<torch::Tensor> tables;  // input-major weights as [in, out] tables
  for (int i : {5, 6, 7, 8, 9, 13, 17, 18, 19}) {
    tables.push_back(params[i].t());
    if (!tables.back().is_contiguous()) return {};
  }
  const torch::Tensor &ln1_w = params[0], &ln1_b = params[1], &tm_mix = params[2], &time_decay = params[3];
  const torch::Tensor &bonus = params[4], &decay_up = params[10], &gn_w = params[11], &gn_b = params[12];
  const torch::Tensor &ln2_w = params[14], &ln2_b = params[15], &cm_mix = params[16];
  const double eps = scalars[7];
  const int64_t B = x.size(0), C = x.size(1), H = bonus.size(0), K = bonus.size(1);
  // Time mix.
  torch::Tensor xa = at::layer_norm(x, {C}, ln1_w, ln1_b, scalars[0]);
  torch::Tensor mixed = at::addcmul(xa, tm_shift - xa, tm_mix.view({tm_mix.size(0), 1, C}));  // [5, B, C]
  std::vector<torch::Tensor> rkvgd = fire(mixed, scalars[3], ints[0], ints[4], eps,
                                          {tables.begin(), tables.begin() + 5});
  torch::Tensor log_decay = at::neg(at::exp(time_decay + at::linear(at::tanh(rkvgd[4]), decay_up)));
  torch::Tensor decay = log_decay.exp();
  torch::Tensor new_wkv = wkv.contiguous().clone();
  torch::Tensor o = torch::empty({B, C}, x.options());
  torch::Tensor u = bonus.contiguous();
  wkv6_recurrence(rkvgd[0].data_ptr<float>(), rkvgd[1].data_ptr<float>(), rkvgd[2].data_ptr<float>(),
                  decay.data_ptr<float>(), u.data_ptr<float>(), new_wkv.data_ptr<float>(), o.data_ptr<float>(), B, 1,
                  H, K, K);
  torch::Tensor gated = at::group_norm(o, H, gn_w, gn_b, scalars[1]) * at::silu(rkvgd[3]);
  torch::Tensor out = fire(gated.unsqueeze(0), scalars[4], ints[1], ints[5], eps, {tables[5]})[0];
  torch::Tensor y = x + out;
  // Channel mix.
  torch::Tensor xc = at::layer_norm(y, {C}, ln2_w, ln2_b, scalars[2]);
  torch::Tensor cmixed = at::addcmul(xc, cm_shift - xc, cm_mix.view({cm_mix.size(0), 1, C}));  // [2, B, C]
  std::vector<torch::Tensor> kr = fire(cmixed, scalars[5], ints[2], ints[6], eps, {tables[6], tables[7]});
  torch::Tensor value = fire(at::relu(kr[0]).square().unsqueeze(0), scalars[6], ints[3], ints[7], eps,
                             {tables[8]})[0];
  return {y + at::sigmoid(kr[1]) * value, xa, new_wkv, xc};
}

std::vector<torch::Tensor> event_linear(torch::Tensor spikes, std::vector<torch::Tensor> tables) {
  TORCH_CHECK(spikes.dim() == 3 && spikes.scalar_type() == torch::kFloat && spikes.is_contiguous() &&
              spikes.device().is_cpu(), "event_linear: spikes must be a contiguous float32 CPU tensor [S, B, in]");
  return accumulate_sites(spikes.data_ptr<float>(), spikes.size(0), spikes.size(1), spikes.size(2), tables,
                          spikes.options());
}
"""

ARCH_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"],
              "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw"]}
FUNCTIONS = ("event_linear", "adaptive_event_linear", "rwkv6_block_step", "adaptive_fire", "wkv6_sequence")
_state: dict[str, Any] = {}


def extension(build: bool = True) -> Any | None:
    """The compiled kernel (built once per process, cached on disk by torch), or ``None`` when it cannot be built
    or ``SPIKELM_EVENT_KERNEL=0``. ``build=False`` only returns it once something built or loaded it in this process
    (the prompt kernels: a small model, whose prompts gain little, never waits for a build; ``SpikeLMForCausalLM``
    loads it for models past ``event.SMALL_BYTES``)."""
    if "module" not in _state and not build:
        return None
    if "module" not in _state:
        _state["module"] = None
        if os.environ.get("SPIKELM_EVENT_KERNEL", "1") != "0":
            try:
                from torch.utils.cpp_extension import load_inline

                # Vector instructions only where this CPU has them; the name keeps builds for other CPUs and other
                # versions of the source apart (two checkouts sharing TORCH_EXTENSIONS_DIR never rebuild each other's).
                capability = torch.backends.cpu.get_cpu_capability().lower()
                flags = ["-O3", *ARCH_FLAGS.get(capability, [])]
                digest = hashlib.sha1(SOURCE.encode(), usedforsecurity=False).hexdigest()[:10]
                _state["module"] = load_inline(name=f"spikelm_cpu_{capability}_{digest}", cpp_sources=SOURCE,
                                               functions=list(FUNCTIONS), extra_cflags=flags, verbose=False)
            except Exception as error:  # no compiler, no headers: the embedding_bag path gives the same results
                warnings.warn(f"event-driven decoding falls back to F.embedding_bag: the C++ kernel did not build "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})",
                              stacklevel=2)
    return _state["module"]


def event_linear(spikes: Tensor, tables: list[Tensor]) -> list[Tensor]:
    """``[spikes[s] @ tables[s] for s]`` reading only fired rows: ``spikes [S, B, in]``, ``tables[s] [in, out_s]``
    contiguous (input-major weights), float32 or bfloat16; each result ``[B, out_s]`` in its table's dtype."""
    module = extension()
    if module is not None and all(t.dtype in (torch.float32, torch.bfloat16) for t in tables):
        return module.event_linear(spikes.float().contiguous(), tables)
    return [_embedding_bag(x, table) for x, table in zip(spikes.unbind(0), tables, strict=True)]


def adaptive_event_linear(x: Tensor, threshold: Tensor, resolution: int, max_spikes: int,
                          tables: list[Tensor]) -> list[Tensor]:
    """The adaptive neuron's inference rule on ``x [S, B, in]`` with ``threshold [S, B]`` (V_th per token), then
    ``event_linear``; the spike values are the neuron's bit for bit (same fp32 operations)."""
    module = extension()
    if module is not None and all(t.dtype in (torch.float32, torch.bfloat16) for t in tables):
        return module.adaptive_event_linear(x.float().contiguous(), threshold.float().contiguous(), resolution,
                                            max_spikes, tables)
    x32, threshold = x.float(), threshold.float().unsqueeze(-1)
    if resolution == 1:
        spikes = torch.div(x32, threshold).round_().clamp_(-max_spikes, max_spikes).mul_(threshold)
    else:
        step = threshold / resolution
        counts = torch.div(x32, step).round_().clamp_(-max_spikes, max_spikes)
        spikes = counts.masked_fill_(x32.abs() < threshold / 2, 0.0).mul_(step)
    return [_embedding_bag(s, table) for s, table in zip(spikes.unbind(0), tables, strict=True)]


def adaptive_fire(x: Tensor, k: float, resolution: int, max_spikes: int, eps: float) -> Tensor | None:
    """The adaptive neuron's inference output ``V_th * counts`` of ``x [..., C]`` (float32, CPU) in one call: V_th
    per token (``max(mean|x|, eps) / k``, or ``max(mean|x| / k, eps / k)`` at resolution 1) and the rule, the
    neuron's torch values bit for bit; ``None`` without the extension (or before it was loaded: ``extension``)."""
    module = extension(build=False)
    if module is None:
        return None
    return module.adaptive_fire(x.contiguous().view(-1, x.shape[-1]), k, resolution, max_spikes, eps).view(x.shape)


def wkv6_sequence(r: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, bonus: Tensor,
                  state: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The RWKV-6 recurrence over ``T`` tokens without autograd: r, k, log_decay ``[B, T, H, K]``, v ``[B, T, H,
    V]``, bonus ``[H, K]``, state ``[B, H, K, V]`` or None (zeros) -> ``(o [B, T, H, V] float32, final state)``,
    the naive scan's math token by token (float32); ``None`` without the extension (or before it was loaded:
    ``extension``)."""
    module = extension(build=False)
    if module is None:
        return None
    B, _, H, K = r.shape
    if state is None:
        state = r.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    decay = log_decay.float().exp()  # as rwkv6_block_step computes it
    o, final = module.wkv6_sequence(*(x.float().contiguous() for x in (r, k, v, decay, bonus, state)))
    return o, final


def _embedding_bag(spikes: Tensor, table: Tensor) -> Tensor:
    """``spikes [B, in] @ table [in, out]`` as weighted bags of the fired rows (one bag per batch row)."""
    rows, columns = spikes.nonzero(as_tuple=True)  # row-major order: each row's events are contiguous
    per_row = torch.bincount(rows, minlength=spikes.shape[0])
    return F.embedding_bag(columns, table, torch.cumsum(per_row, 0) - per_row, mode="sum",
                           per_sample_weights=spikes[rows, columns].to(table.dtype))


__all__ = ["event_linear", "adaptive_event_linear", "adaptive_fire", "wkv6_sequence", "extension"]
