// carft_mega_cuda: batched token LCS masks with the DESIGN.md Sec. 4 tie-break; the CPU path and
// the torch binding of the CUDA path (lcs_kernel.cu, built only with a CUDA torch and nvcc).
// CPU: one pair per task over at::parallel_for. Row i of the DP is a bit vector V_i over the
// columns of b (bit j-1 is 0 iff L[i][j] = L[i][j-1] + 1), updated with Hyyro's add-based
// recurrence (Allison & Dix 1986; H. Hyyro, AWOCA 2004): ceil(Lb/64) word operations per row.
// The traceback needs only the V_i and the match masks (see traceback()). Memory per thread:
// m * ceil(n/64) words for the V_i plus (distinct tokens of b + 1) * ceil(n/64) for the masks,
// i.e. O(La * Lb / 8) bytes per thread, not per batch. 64 CoT-like pairs of 512 tokens: 0.5 ms on
// 2 threads, 0.95 ms on 1, vs 1.5 s for lcs_masks_ref (2-core Xeon dev box, benchmarks/bench_lcs.py).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef CARFT_WITH_CUDA
#include "lcs_kernel.h"
#else
// Without the CUDA part these stand-ins take the launcher's place, so that lcs_masks_cuda below
// still compiles in every (CPU-only CI) build; it is registered only when CARFT_WITH_CUDA is set.
namespace {
int carft_lcs_cuda_workspace_bytes(int64_t, int64_t, int64_t, int, int, size_t*) { return -1; }
int carft_lcs_cuda_launch(const void*, const void*, int, const int64_t*, const int64_t*, int64_t,
                          int64_t, int64_t, bool*, bool*, int64_t*, void*, size_t, int, void*) {
  return -1;
}
const char* carft_lcs_cuda_error_string(int) { return "carft_mega_cuda was built without CUDA"; }
}  // namespace
#endif

#define CHECK_DEVICE(x, dev_type)                                                      \
  TORCH_CHECK_VALUE((x).device().type() == (dev_type), "lcs_masks: " #x " must be a ", \
                    c10::DeviceTypeName(dev_type), " tensor, got one on ", (x).device())
#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK_VALUE((x).is_contiguous(), "lcs_masks: " #x " must be contiguous")
#define CHECK_SHAPE(x, ...)                                                            \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}),                     \
                    "lcs_masks: " #x " must have shape (" #__VA_ARGS__ ") = ",         \
                    at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

namespace {

using Masks = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Reused across the pairs of one parallel_for chunk.
template <typename T>
struct PairWorkspace {
  std::vector<T> keys;             // open-addressing hash table: token ...
  std::vector<int64_t> slot_class; // ... -> class id (-1 = empty slot)
  std::vector<int64_t> b_class;    // [n] class of each b[j]
  std::vector<uint64_t> match;     // [(#classes + 1) * W]; the last row (all 0) is for absent tokens
  std::vector<int64_t> row_class;  // [m] row of `match` for each a[i]
  std::vector<uint64_t> v;         // [m * W] the V_i
  std::vector<uint64_t> ones;      // [W] V_0
};

inline uint64_t hash_token(uint64_t x) { return x * 0x9E3779B97F4A7C15ull; }  // Fibonacci hashing

// Fills ws.match / ws.row_class: the match mask of a[i] is ws.match[row_class[i] * W ...]. The
// classes are b's distinct tokens, found with a hash table (a sort cost ~3x more at 512 tokens).
template <typename T>
void build_match_masks(const T* a, int64_t m, const T* b, int64_t n, int64_t W,
                       PairWorkspace<T>& ws) {
  int bits = 4;
  while ((int64_t{1} << bits) < 2 * n) ++bits;  // load factor <= 1/2
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  const int shift = 64 - bits;
  ws.keys.resize(mask + 1);
  ws.slot_class.assign(mask + 1, -1);
  ws.b_class.resize(n);
  int64_t n_classes = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint64_t h = hash_token(static_cast<uint64_t>(b[j])) >> shift;
    while (ws.slot_class[h] >= 0 && ws.keys[h] != b[j]) h = (h + 1) & mask;
    if (ws.slot_class[h] < 0) {
      ws.keys[h] = b[j];
      ws.slot_class[h] = n_classes++;
    }
    ws.b_class[j] = ws.slot_class[h];
  }
  ws.match.assign((n_classes + 1) * W, 0);
  for (int64_t j = 0; j < n; ++j) ws.match[ws.b_class[j] * W + (j >> 6)] |= uint64_t{1} << (j & 63);
  ws.row_class.resize(m);
  for (int64_t i = 0; i < m; ++i) {
    uint64_t h = hash_token(static_cast<uint64_t>(a[i])) >> shift;
    while (ws.slot_class[h] >= 0 && ws.keys[h] != a[i]) h = (h + 1) & mask;
    ws.row_class[i] = ws.slot_class[h] >= 0 ? ws.slot_class[h] : n_classes;
  }
}

// At a mismatch L[i][j] = max(L[i-1][j], L[i][j-1]) and both lie in {L[i][j] - 1, L[i][j]}, so
// the reference's "L[i-1][j] > L[i][j-1]" (move up) holds iff L[i][j-1] = L[i][j] - 1, i.e. iff bit
// j-1 of V_i is 0. From (i, j) the path therefore moves left to the highest column p <= j-1 whose
// bit in (match mask of a[i-1]) | ~V_i is set, then goes diagonal (match) or up (0 bit): one
// count-leading-zeros per row instead of one step per cell.
template <typename T>
int64_t traceback(int64_t m, int64_t n, int64_t W, const PairWorkspace<T>& ws, bool* out_a,
                  bool* out_b) {
  int64_t i = m, j = n, count = 0;
  while (i > 0 && j > 0) {
    const uint64_t* v = ws.v.data() + (i - 1) * W;
    const uint64_t* mt = ws.match.data() + ws.row_class[i - 1] * W;
    int64_t p = j - 1;
    int64_t w = p >> 6;
    uint64_t word = (mt[w] | ~v[w]) & (~uint64_t{0} >> (63 - (p & 63)));
    while (word == 0 && w > 0) {
      --w;
      word = mt[w] | ~v[w];
    }
    if (word == 0) break;                             // left off the table: j reaches 0
    p = (w << 6) + 63 - __builtin_clzll(word);        // GCC/Clang builtin; word != 0
    if ((mt[w] >> (p & 63)) & 1u) {                   // a[i-1] == b[p]: diagonal
      out_a[i - 1] = true;
      out_b[p] = true;
      ++count;
      j = p;
    } else {  // up
      j = p + 1;
    }
    --i;
  }
  return count;
}

// LCS of a[:m] and b[:n]; writes the in-LCS flags (out_a / out_b must be zeroed) and returns the
// length.
template <typename T>
int64_t lcs_pair(const T* a, int64_t m, const T* b, int64_t n, bool* out_a, bool* out_b,
                 PairWorkspace<T>& ws) {
  if (m == 0 || n == 0) return 0;
  const int64_t W = (n + 63) / 64;
  build_match_masks(a, m, b, n, W, ws);
  ws.ones.assign(W, ~uint64_t{0});
  ws.v.resize(m * W);
  const uint64_t* prev = ws.ones.data();
  for (int64_t i = 0; i < m; ++i) {
    const uint64_t* mt = ws.match.data() + ws.row_class[i] * W;
    uint64_t* cur = ws.v.data() + i * W;
    uint64_t carry = 0;
    for (int64_t w = 0; w < W; ++w) {
      // V_i = V_{i-1} + (V_{i-1} & M) | (V_{i-1} & ~M), a multi-word add with carry.
      const uint64_t x = prev[w];
      const uint64_t u = x & mt[w];
      const uint64_t s1 = x + u;
      const uint64_t s2 = s1 + carry;
      carry = static_cast<uint64_t>(s1 < x) | static_cast<uint64_t>(s2 < s1);
      cur[w] = s2 | (x & ~mt[w]);
    }
    prev = cur;
  }
  return traceback(m, n, W, ws, out_a, out_b);
}

// Shared argument checks; returns the tokens in a common dtype and the lengths as int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> check_and_prepare(
    const at::Tensor& a, const at::Tensor& a_len, const at::Tensor& b, const at::Tensor& b_len,
    c10::DeviceType dev) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, "lcs_masks: a and b must be 2-D (N, L), got ",
                    a.sizes(), " and ", b.sizes());
  const int64_t n_rows = a.size(0);
  CHECK_SHAPE(b, n_rows, b.size(1));
  CHECK_SHAPE(a_len, n_rows);
  CHECK_SHAPE(b_len, n_rows);
  for (const auto* t : {&a, &b, &a_len, &b_len}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                     "lcs_masks: a, b, a_len and b_len must be int32 or int64, got ",
                     a.scalar_type(), ", ", b.scalar_type(), ", ", a_len.scalar_type(), ", ",
                     b_len.scalar_type());
  }
  CHECK_DEVICE(a, dev);
  CHECK_DEVICE(b, dev);
  CHECK_DEVICE(a_len, dev);
  CHECK_DEVICE(b_len, dev);
  TORCH_CHECK_VALUE(a.device() == b.device() && a.device() == a_len.device() &&
                        a.device() == b_len.device(),
                    "lcs_masks: all inputs must be on one device, got a on ", a.device(),
                    ", b on ", b.device(), ", a_len on ", a_len.device(), ", b_len on ",
                    b_len.device());
  CHECK_CONTIGUOUS(a);
  CHECK_CONTIGUOUS(b);
  // Equality is all the LCS needs, so mixed token dtypes compare as int64.
  at::Tensor ta = a, tb = b;
  if (a.scalar_type() != b.scalar_type()) {
    ta = a.to(at::kLong);
    tb = b.to(at::kLong);
  }
  at::Tensor la = a_len.to(at::kLong).contiguous();
  at::Tensor lb = b_len.to(at::kLong).contiguous();
  return {ta, la, tb, lb};
}

// Range check of the lengths on the CPU copies; names the first bad row.
void check_lengths_cpu(const at::Tensor& a_len, const at::Tensor& b_len, int64_t la, int64_t lb) {
  const int64_t* pa = a_len.data_ptr<int64_t>();
  const int64_t* pb = b_len.data_ptr<int64_t>();
  for (int64_t r = 0; r < a_len.numel(); ++r) {
    TORCH_CHECK_VALUE(pa[r] >= 0 && pa[r] <= la, "lcs_masks: a_len[", r, "] = ", pa[r],
                      " is outside [0, La = ", la, "]");
    TORCH_CHECK_VALUE(pb[r] >= 0 && pb[r] <= lb, "lcs_masks: b_len[", r, "] = ", pb[r],
                      " is outside [0, Lb = ", lb, "]");
  }
}

template <typename T>
void lcs_masks_cpu_typed(const at::Tensor& a, const at::Tensor& a_len, const at::Tensor& b,
                         const at::Tensor& b_len, at::Tensor& in_a, at::Tensor& in_b,
                         at::Tensor& lcs_len) {
  const int64_t n_rows = a.size(0), la = a.size(1), lb = b.size(1);
  const T* pa = a.data_ptr<T>();
  const T* pb = b.data_ptr<T>();
  const int64_t* pla = a_len.data_ptr<int64_t>();
  const int64_t* plb = b_len.data_ptr<int64_t>();
  bool* oa = in_a.data_ptr<bool>();
  bool* ob = in_b.data_ptr<bool>();
  int64_t* ol = lcs_len.data_ptr<int64_t>();
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    PairWorkspace<T> ws;
    for (int64_t r = begin; r < end; ++r) {
      ol[r] = lcs_pair(pa + r * la, pla[r], pb + r * lb, plb[r], oa + r * la, ob + r * lb, ws);
    }
  });
}

}  // namespace

Masks lcs_masks_cpu(const at::Tensor& a, const at::Tensor& a_len, const at::Tensor& b,
                    const at::Tensor& b_len) {
  auto [ta, la, tb, lb] = check_and_prepare(a, a_len, b, b_len, c10::DeviceType::CPU);
  check_lengths_cpu(la, lb, ta.size(1), tb.size(1));
  at::Tensor in_a = at::zeros(ta.sizes(), ta.options().dtype(at::kBool));
  at::Tensor in_b = at::zeros(tb.sizes(), tb.options().dtype(at::kBool));
  at::Tensor lcs_len = at::zeros({ta.size(0)}, ta.options().dtype(at::kLong));
  switch (ta.scalar_type()) {
    case at::kInt:
      lcs_masks_cpu_typed<int32_t>(ta, la, tb, lb, in_a, in_b, lcs_len);
      break;
    case at::kLong:
      lcs_masks_cpu_typed<int64_t>(ta, la, tb, lb, in_a, in_b, lcs_len);
      break;
    default:
      TORCH_CHECK_TYPE(false, "lcs_masks: unsupported token dtype ", ta.scalar_type());
  }
  return {in_a, in_b, lcs_len};
}

// `stream` is the cudaStream_t as an integer (torch.cuda.current_stream(dev).cuda_stream), so that
// this file needs no CUDA header and builds the same way with and without the CUDA part.
// check_lengths=false skips the one synchronising range check (the kernel clamps the lengths).
Masks lcs_masks_cuda(const at::Tensor& a, const at::Tensor& a_len, const at::Tensor& b,
                     const at::Tensor& b_len, int64_t stream, bool check_lengths) {
  auto [ta, la, tb, lb] = check_and_prepare(a, a_len, b, b_len, c10::DeviceType::CUDA);
  const int64_t n_rows = ta.size(0), len_a = ta.size(1), len_b = tb.size(1);
  if (check_lengths && n_rows > 0) {  // one synchronising check; a bad length names its row
    const bool bad = at::logical_or(
                         at::logical_or(la.lt(0), la.gt(len_a)).any(),
                         at::logical_or(lb.lt(0), lb.gt(len_b)).any())
                         .item<bool>();
    if (bad) check_lengths_cpu(la.cpu(), lb.cpu(), len_a, len_b);
  }
  at::Tensor in_a = at::empty(ta.sizes(), ta.options().dtype(at::kBool));
  at::Tensor in_b = at::empty(tb.sizes(), tb.options().dtype(at::kBool));
  at::Tensor lcs_len = at::empty({n_rows}, ta.options().dtype(at::kLong));
  const int token_bytes = static_cast<int>(ta.element_size());
  const int device = ta.get_device();
  size_t ws_bytes = 0;
  int err = carft_lcs_cuda_workspace_bytes(n_rows, len_a, len_b, token_bytes, device, &ws_bytes);
  TORCH_CHECK(err == 0, "lcs_masks_cuda: ", carft_lcs_cuda_error_string(err));
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, ta.options().dtype(at::kByte));
  }
  err = carft_lcs_cuda_launch(ta.data_ptr(), tb.data_ptr(), token_bytes, la.data_ptr<int64_t>(),
                              lb.data_ptr<int64_t>(), n_rows, len_a, len_b,
                              in_a.data_ptr<bool>(), in_b.data_ptr<bool>(),
                              lcs_len.data_ptr<int64_t>(),
                              ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes, device,
                              reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "lcs_masks_cuda: kernel launch failed: ",
              carft_lcs_cuda_error_string(err));
  return {in_a, in_b, lcs_len};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "carft_mega compiled ops: batched token LCS masks (kernels/cuda/lcs)";
  m.def("lcs_masks_cpu", &lcs_masks_cpu,
        "Batched LCS of a[r, :a_len[r]] and b[r, :b_len[r]] on CPU tensors (DESIGN.md Sec. 4 "
        "tie-break). a (N, La), b (N, Lb): int32/int64 contiguous; a_len, b_len (N,). Returns "
        "(in_lcs_a (N, La) bool, in_lcs_b (N, Lb) bool, lcs_len (N,) int64).",
        py::arg("a"), py::arg("a_len"), py::arg("b"), py::arg("b_len"));
#ifdef CARFT_WITH_CUDA
  m.def("lcs_masks_cuda", &lcs_masks_cuda,
        "lcs_masks_cpu for CUDA tensors, enqueued on `stream` (an int cudaStream_t of the "
        "tensors' device). With check_lengths it synchronises once to check the lengths; "
        "without, out-of-range lengths are clamped to [0, L].",
        py::arg("a"), py::arg("a_len"), py::arg("b"), py::arg("b_len"), py::arg("stream"),
        py::arg("check_lengths") = true);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
