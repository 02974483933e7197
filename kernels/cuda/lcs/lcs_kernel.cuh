// Device code of the batched LCS kernel (included by lcs_kernel.cu; see its header comment).
// Kept apart from the host launcher so that tests/ops/lcs_kernel_emu.cpp can compile this exact
// source for the CPU, with the warp intrinsics emulated by threads, and check it bit for bit.
#pragma once

#include <cstdint>

namespace carft_lcs {

constexpr int kThreads = 512;
constexpr unsigned kFullMask = 0xffffffffu;

// out = V_prev + (V_prev & M) + carry_in | (V_prev & ~M); returns the carry out of bit 63.
__device__ __forceinline__ uint64_t row_step(uint64_t x, uint64_t match, uint64_t& carry) {
  const uint64_t u = x & match;
  const uint64_t s1 = x + u;
  const uint64_t s2 = s1 + carry;
  carry = static_cast<uint64_t>(s1 < x) | static_cast<uint64_t>(s2 < s1);
  return s2 | (x & ~match);  // x - u == x & ~match: no borrow, u is a subset of x
}

// S > 0: each lane of warp 0 caches its (at most S) words of V_{i-1} in registers.
// S == 0: any Lb; the lane reads V_{i-1} back from the table.
// kSmem: the table and the tokens live in dynamic shared memory, else in `workspace`.
template <typename T, int S, bool kSmem>
__global__ void __launch_bounds__(kThreads)
    lcs_masks_kernel(const T* __restrict__ a, const T* __restrict__ b,
                     const int64_t* __restrict__ a_len, const int64_t* __restrict__ b_len,
                     int64_t la, int64_t lb, int64_t wmax, bool* __restrict__ in_a,
                     bool* __restrict__ in_b, int64_t* __restrict__ lcs_len,
                     uint64_t* __restrict__ workspace) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t pair = blockIdx.x;
  const int tid = threadIdx.x;
  const T* A = a + pair * la;
  const T* B = b + pair * lb;
  bool* out_a = in_a + pair * la;
  bool* out_b = in_b + pair * lb;
  // The host validates the lengths; clamp anyway so that a bad length cannot read out of bounds.
  const int64_t m = min(max(a_len[pair], int64_t{0}), la);
  const int64_t n = min(max(b_len[pair], int64_t{0}), lb);
  const int64_t W = (n + 63) / 64;  // words per table row

  uint64_t* table;
  if constexpr (kSmem) {
    table = reinterpret_cast<uint64_t*>(smem);
    T* a_s = reinterpret_cast<T*>(table + la * wmax);
    T* b_s = a_s + la;
    for (int64_t t = tid; t < m; t += blockDim.x) a_s[t] = A[t];
    for (int64_t t = tid; t < n; t += blockDim.x) b_s[t] = B[t];
    A = a_s;
    B = b_s;
  } else {
    table = workspace + pair * la * wmax;
  }
  for (int64_t t = tid; t < la; t += blockDim.x) out_a[t] = false;
  for (int64_t t = tid; t < lb; t += blockDim.x) out_b[t] = false;
  __syncthreads();

  // Phase 1: table[i][w] = match mask of a[i] against b[64w : 64w + 64]. Consecutive threads take
  // consecutive rows of one word, so the b tokens they read are the same address (a broadcast).
  const int64_t cells = m * W;
  for (int64_t t = tid; t < cells; t += blockDim.x) {
    const int64_t w = t / m;
    const int64_t i = t - w * m;
    const T ai = A[i];
    const T* bw = B + w * 64;
    const int64_t cnt = min(int64_t{64}, n - w * 64);
    uint64_t bits = 0;
    if (cnt == 64) {
#pragma unroll 16
      for (int q = 0; q < 64; ++q) bits |= static_cast<uint64_t>(bw[q] == ai) << q;
    } else {
      for (int q = 0; q < cnt; ++q) bits |= static_cast<uint64_t>(bw[q] == ai) << q;
    }
    table[i * W + w] = bits;
  }
  __syncthreads();
  if (tid >= 32) return;  // phases 2 and 3 are one warp's: the rest of the block is done
  const int lane = tid;
  if (m == 0 || n == 0) {
    if (lane == 0) lcs_len[pair] = 0;
    return;
  }

  // Phase 2: wavefront over (row, lane). At step s lane k handles row i = s - k; the carry of
  // row i leaves lane k at step s and enters lane k + 1 at step s + 1.
  const int64_t spl = S > 0 ? S : (W + 31) / 32;  // words per lane
  const int64_t lanes = (W + spl - 1) / spl;      // lanes that own words, <= 32
  const int64_t w0 = lane * spl;
  uint64_t v[S > 0 ? S : 1];
#pragma unroll
  for (int k = 0; k < (S > 0 ? S : 1); ++k) v[k] = ~uint64_t{0};
  uint64_t carry_out = 0;
  const int64_t steps = m + lanes - 1;
  for (int64_t s = 0; s < steps; ++s) {
    uint64_t carry = __shfl_up_sync(kFullMask, carry_out, 1);
    if (lane == 0) carry = 0;
    const int64_t i = s - lane;
    if (lane < lanes && i >= 0 && i < m) {
      uint64_t* row = table + i * W;
      if constexpr (S > 0) {
#pragma unroll
        for (int k = 0; k < S; ++k) {
          const int64_t w = w0 + k;
          if (w < W) {
            v[k] = row_step(v[k], row[w], carry);
            row[w] = v[k];
          }
        }
      } else {
        const uint64_t* prev = i > 0 ? row - W : nullptr;
        const int64_t w1 = min(w0 + spl, W);
        for (int64_t w = w0; w < w1; ++w) {
          const uint64_t x = prev != nullptr ? prev[w] : ~uint64_t{0};
          row[w] = row_step(x, row[w], carry);
        }
      }
      carry_out = carry;
    }
  }
  __syncwarp();

  // Phase 3: traceback from (m, n). At a mismatch L[i][j] = max(up, left) and both lie in
  // {L[i][j] - 1, L[i][j]}, so "L[i-1][j] > L[i][j-1]" holds iff bit j-1 of V_i is 0. From (i, j)
  // the path moves left until a column p = j-1 with a match (diagonal) or a 0 bit (up); lane l
  // tests column j-1-l, and the lowest lane that stops wins.
  int64_t i = m, j = n, count = 0;
  while (i > 0 && j > 0) {
    const T ai = A[i - 1];
    const uint64_t* vrow = table + (i - 1) * W;
    const int64_t p = j - 1 - lane;
    int stop = 1, match = 0;
    if (p >= 0) {
      match = B[p] == ai;
      stop = match | static_cast<int>(((vrow[p >> 6] >> (p & 63)) & 1u) ^ 1u);
    }
    const unsigned ballot = __ballot_sync(kFullMask, stop);
    const unsigned matches = __ballot_sync(kFullMask, match);  // independent: no extra latency
    if (ballot == 0u) {  // 32 left moves
      j -= 32;
      continue;
    }
    const int first = __ffs(ballot) - 1;
    const int64_t q = j - 1 - first;
    if (q < 0) break;  // left off the table: j reaches 0
    if ((matches >> first) & 1u) {
      if (lane == 0) {
        out_a[i - 1] = true;
        out_b[q] = true;
      }
      ++count;
      j = q;
    } else {
      j = q + 1;
    }
    --i;
  }
  if (lane == 0) lcs_len[pair] = count;
}

}  // namespace carft_lcs
