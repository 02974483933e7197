// Plain C interface of the CUDA LCS kernels (lcs_kernel.cu), so that the torch binding (lcs.cpp)
// needs no CUDA or c10/cuda header: it passes raw pointers, the device index and the stream.
// Return values are cudaError_t codes (0 = success); carft_lcs_cuda_error_string names them.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of global workspace that carft_lcs_cuda_launch needs for these shapes on `device`: 0 when
// each pair's bit table fits in shared memory, else n_pairs * la * ceil(lb / 64) * 8.
int carft_lcs_cuda_workspace_bytes(int64_t n_pairs, int64_t la, int64_t lb, int token_bytes,
                                   int device, size_t* bytes);

// Batched LCS masks on `device`, enqueued on `stream` (a cudaStream_t; NULL = legacy default).
//   a [n_pairs, la], b [n_pairs, lb]: token ids, int32 (token_bytes 4) or int64 (token_bytes 8),
//     contiguous, both of the same type.
//   a_len, b_len [n_pairs] int64: valid prefix lengths, in [0, la] and [0, lb] (clamped if not).
//   in_a [n_pairs, la], in_b [n_pairs, lb] bool (1 byte), lcs_len [n_pairs] int64: outputs, fully
//     written by the kernel (no zero-fill needed).
//   workspace: at least carft_lcs_cuda_workspace_bytes(...) bytes (may be NULL when that is 0).
int carft_lcs_cuda_launch(const void* a, const void* b, int token_bytes, const int64_t* a_len,
                          const int64_t* b_len, int64_t n_pairs, int64_t la, int64_t lb,
                          bool* in_a, bool* in_b, int64_t* lcs_len, void* workspace,
                          size_t workspace_bytes, int device, void* stream);

const char* carft_lcs_cuda_error_string(int err);

#ifdef __cplusplus
}
#endif
