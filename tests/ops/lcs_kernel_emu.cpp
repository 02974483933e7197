// Runs the CUDA LCS kernel source (kernels/cuda/lcs/lcs_kernel.cuh) on the CPU, for machines
// without a GPU. Each CUDA thread of a block is an OS thread; __syncthreads() is a barrier over the
// block and every warp intrinsic is a barrier-separated exchange through a slot array, so lanes
// run in lock step at each intrinsic as on the GPU. Blocks run one after another (they share the
// emulated shared memory). Built with g++ and called through ctypes by tests/ops/test_lcs.py; not
// part of the package.
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuDim3 threadIdx, blockIdx;
EmuDim3 blockDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

using std::max;
using std::min;

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32] = {};
};

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<Warp>> warps;
};

Block* g_block = nullptr;

inline Warp& my_warp() { return *g_block->warps[threadIdx.x / 32]; }
inline unsigned my_lane() { return threadIdx.x % 32; }

template <typename V>
inline uint64_t to_bits(V v) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(V));
  return u;
}
template <typename V>
inline V from_bits(uint64_t u) {
  V v;
  std::memcpy(&v, &u, sizeof(V));
  return v;
}

}  // namespace emu

inline void __syncthreads() { emu::g_block->all->arrive_and_wait(); }
inline void __syncwarp() { emu::my_warp().bar.arrive_and_wait(); }

template <typename V>
V __shfl_up_sync(unsigned, V v, unsigned delta) {
  emu::Warp& w = emu::my_warp();
  const unsigned lane = emu::my_lane();
  w.slot[lane] = emu::to_bits(v);
  w.bar.arrive_and_wait();
  const V out = lane >= delta ? emu::from_bits<V>(w.slot[lane - delta]) : v;
  w.bar.arrive_and_wait();
  return out;
}

template <typename V>
V __shfl_sync(unsigned, V v, int src) {
  emu::Warp& w = emu::my_warp();
  w.slot[emu::my_lane()] = emu::to_bits(v);
  w.bar.arrive_and_wait();
  const V out = emu::from_bits<V>(w.slot[src & 31]);
  w.bar.arrive_and_wait();
  return out;
}

inline unsigned __ballot_sync(unsigned, int pred) {
  emu::Warp& w = emu::my_warp();
  w.slot[emu::my_lane()] = pred != 0;
  w.bar.arrive_and_wait();
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l) out |= static_cast<unsigned>(w.slot[l] != 0) << l;
  w.bar.arrive_and_wait();
  return out;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

namespace carft_lcs {
constexpr size_t kEmuSmemBytes = size_t{8} << 20;
alignas(16) unsigned char smem[kEmuSmemBytes];
}  // namespace carft_lcs

#include "lcs_kernel.cuh"

namespace {

template <typename T, int S, bool kSmem>
void run_grid(const void* a, const void* b, const int64_t* a_len, const int64_t* b_len,
              int64_t n_pairs, int64_t la, int64_t lb, int64_t wmax, bool* in_a, bool* in_b,
              int64_t* lcs_len, uint64_t* workspace, int threads) {
  blockDim.x = static_cast<unsigned>(threads);
  for (int64_t pair = 0; pair < n_pairs; ++pair) {
    emu::Block block;
    block.all = std::make_unique<std::barrier<>>(threads);
    for (int w = 0; w < threads / 32; ++w) block.warps.push_back(std::make_unique<emu::Warp>());
    emu::g_block = &block;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = static_cast<unsigned>(pair);
        carft_lcs::lcs_masks_kernel<T, S, kSmem>(static_cast<const T*>(a),
                                                 static_cast<const T*>(b), a_len, b_len, la, lb,
                                                 wmax, in_a, in_b, lcs_len, workspace);
      });
    }
    for (auto& th : pool) th.join();
    emu::g_block = nullptr;
  }
}

template <typename T, bool kSmem>
int run_s(int s, const void* a, const void* b, const int64_t* a_len, const int64_t* b_len,
          int64_t n_pairs, int64_t la, int64_t lb, int64_t wmax, bool* in_a, bool* in_b,
          int64_t* lcs_len, uint64_t* workspace, int threads) {
  switch (s) {
    case 1: run_grid<T, 1, kSmem>(a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, workspace, threads); return 0;
    case 2: run_grid<T, 2, kSmem>(a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, workspace, threads); return 0;
    case 4: run_grid<T, 4, kSmem>(a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, workspace, threads); return 0;
    case 0: run_grid<T, 0, kSmem>(a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, workspace, threads); return 0;
    default: return 2;
  }
}

}  // namespace

// words_per_lane: -1 picks S as lcs_kernel.cu's make_plan does; 0 forces the dynamic path; 1, 2,
// 4 force that S (it must cover ceil(lb / 64) words with 32 lanes). use_smem: 1 runs the
// shared-memory variant, 0 the global-workspace one. Returns 0 on success.
extern "C" int emu_lcs_masks(const void* a, const void* b, int token_bytes, const int64_t* a_len,
                             const int64_t* b_len, int64_t n_pairs, int64_t la, int64_t lb,
                             bool* in_a, bool* in_b, int64_t* lcs_len, int words_per_lane,
                             int use_smem, int threads) {
  if (threads < 32 || threads % 32 != 0) return 1;
  const int64_t wmax = (lb + 63) / 64;
  const int64_t spl = (wmax + 31) / 32;
  int s = words_per_lane;
  if (s < 0) s = spl <= 1 ? 1 : spl <= 2 ? 2 : spl <= 4 ? 4 : 0;
  if (s > 0 && s < spl) return 3;
  std::vector<uint64_t> workspace;
  if (use_smem) {
    const size_t need = static_cast<size_t>(la * wmax * 8 + (la + lb) * token_bytes);
    if (need > carft_lcs::kEmuSmemBytes) return 4;
  } else {
    workspace.assign(static_cast<size_t>(n_pairs * la * wmax) + 1, 0);
  }
  uint64_t* ws = workspace.empty() ? nullptr : workspace.data();
  if (token_bytes == 4) {
    return use_smem ? run_s<int32_t, true>(s, a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, ws, threads)
                    : run_s<int32_t, false>(s, a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, ws, threads);
  }
  if (token_bytes == 8) {
    return use_smem ? run_s<int64_t, true>(s, a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, ws, threads)
                    : run_s<int64_t, false>(s, a, b, a_len, b_len, n_pairs, la, lb, wmax, in_a, in_b, lcs_len, ws, threads);
  }
  return 5;
}
