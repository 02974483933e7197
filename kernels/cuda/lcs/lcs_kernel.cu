// Batched token LCS with the DESIGN.md Sec. 4 tie-break; one thread block per (a, b) pair.
// Row i of the DP is a bit vector V_i over the columns of b: bit j-1 is 0 iff L[i][j] = L[i][j-1] + 1.
// With M the match mask of a[i-1], V_i = (V_{i-1} + (V_{i-1} & M)) | (V_{i-1} & ~M), a multi-word
// add (Allison & Dix 1986; H. Hyyro, "Bit-parallel LCS-length computation revisited", AWOCA 2004).
// Phase 1: the whole block writes the match masks of all rows into a table. Phase 2: warp 0 runs
// the recurrence as a wavefront (lane k owns S words of a row and hands its carry to lane k+1 one
// step later), overwriting row i of the table with V_i. Phase 3: warp 0 traces back, testing 32
// columns per step with one ballot. The table (La * ceil(Lb/64) * 8 bytes, plus the tokens) lives
// in shared memory when it fits the opt-in limit (1024 x 1024 int64 pairs: 144 KiB), else in a
// global workspace; phase 2 keeps its words in registers up to Lb = 8192 (S <= 4).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "lcs_kernel.cuh"
#include "lcs_kernel.h"

namespace {

using carft_lcs::kThreads;
using carft_lcs::lcs_masks_kernel;

struct Plan {
  int64_t wmax;
  size_t smem_bytes;  // dynamic shared memory per block (0 in workspace mode)
  bool use_smem;
  int words_per_lane;  // template S: 1, 2, 4, or 0 (dynamic)
};

cudaError_t make_plan(int64_t la, int64_t lb, int token_bytes, int device, Plan* plan) {
  int optin = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  plan->wmax = (lb + 63) / 64;
  const size_t need = static_cast<size_t>(la) * static_cast<size_t>(plan->wmax) * 8u +
                      static_cast<size_t>(la + lb) * static_cast<size_t>(token_bytes);
  plan->use_smem = need <= static_cast<size_t>(optin);
  plan->smem_bytes = plan->use_smem ? need : 0;
  const int64_t spl = (plan->wmax + 31) / 32;
  plan->words_per_lane = spl <= 1 ? 1 : spl <= 2 ? 2 : spl <= 4 ? 4 : 0;
  return cudaSuccess;
}

template <typename T, int S, bool kSmem>
cudaError_t launch(const Plan& plan, const void* a, const void* b, const int64_t* a_len,
                   const int64_t* b_len, int64_t n_pairs, int64_t la, int64_t lb, bool* in_a,
                   bool* in_b, int64_t* lcs_len, void* workspace, cudaStream_t stream) {
  auto kernel = lcs_masks_kernel<T, S, kSmem>;
  if (plan.smem_bytes > 48u * 1024u) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(n_pairs), kThreads, plan.smem_bytes, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), a_len, b_len, la, lb, plan.wmax, in_a,
      in_b, lcs_len, static_cast<uint64_t*>(workspace));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Plan& plan, const void* a, const void* b, const int64_t* a_len,
                         const int64_t* b_len, int64_t n_pairs, int64_t la, int64_t lb,
                         bool* in_a, bool* in_b, int64_t* lcs_len, void* workspace,
                         cudaStream_t stream) {
#define CARFT_LCS_LAUNCH(S, SMEM)                                                                \
  return launch<T, S, SMEM>(plan, a, b, a_len, b_len, n_pairs, la, lb, in_a, in_b, lcs_len,     \
                            workspace, stream)
  if (plan.use_smem) {
    switch (plan.words_per_lane) {
      case 1: CARFT_LCS_LAUNCH(1, true);
      case 2: CARFT_LCS_LAUNCH(2, true);
      case 4: CARFT_LCS_LAUNCH(4, true);
      default: CARFT_LCS_LAUNCH(0, true);
    }
  }
  switch (plan.words_per_lane) {
    case 1: CARFT_LCS_LAUNCH(1, false);
    case 2: CARFT_LCS_LAUNCH(2, false);
    case 4: CARFT_LCS_LAUNCH(4, false);
    default: CARFT_LCS_LAUNCH(0, false);
  }
#undef CARFT_LCS_LAUNCH
}

// Runs on `device` and restores the caller's current device.
struct DeviceScope {
  int prev = -1;
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&prev) == cudaSuccess && prev != device) {
      cudaSetDevice(device);
    } else {
      prev = -1;
    }
  }
  ~DeviceScope() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

}  // namespace

extern "C" int carft_lcs_cuda_workspace_bytes(int64_t n_pairs, int64_t la, int64_t lb,
                                              int token_bytes, int device, size_t* bytes) {
  if (bytes == nullptr || n_pairs < 0 || la < 0 || lb < 0) return cudaErrorInvalidValue;
  Plan plan;
  const cudaError_t err = make_plan(la, lb, token_bytes, device, &plan);
  if (err != cudaSuccess) return err;
  *bytes = plan.use_smem ? 0u
                         : static_cast<size_t>(n_pairs) * static_cast<size_t>(la) *
                               static_cast<size_t>(plan.wmax) * 8u;
  return cudaSuccess;
}

extern "C" int carft_lcs_cuda_launch(const void* a, const void* b, int token_bytes,
                                     const int64_t* a_len, const int64_t* b_len, int64_t n_pairs,
                                     int64_t la, int64_t lb, bool* in_a, bool* in_b,
                                     int64_t* lcs_len, void* workspace, size_t workspace_bytes,
                                     int device, void* stream) {
  if (n_pairs < 0 || la < 0 || lb < 0 || (token_bytes != 4 && token_bytes != 8)) {
    return cudaErrorInvalidValue;
  }
  if (n_pairs == 0) return cudaSuccess;
  if (n_pairs > 0x7fffffff) return cudaErrorInvalidConfiguration;  // gridDim.x limit
  DeviceScope scope(device);
  Plan plan;
  cudaError_t err = make_plan(la, lb, token_bytes, device, &plan);
  if (err != cudaSuccess) return err;
  if (!plan.use_smem) {
    const size_t need = static_cast<size_t>(n_pairs) * static_cast<size_t>(la) *
                        static_cast<size_t>(plan.wmax) * 8u;
    if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (token_bytes == 4) {
    err = launch_typed<int32_t>(plan, a, b, a_len, b_len, n_pairs, la, lb, in_a, in_b, lcs_len,
                                workspace, s);
  } else {
    err = launch_typed<int64_t>(plan, a, b, a_len, b_len, n_pairs, la, lb, in_a, in_b, lcs_len,
                                workspace, s);
  }
  return err;
}

extern "C" const char* carft_lcs_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
