// Tile-skipping masked GEMMs behind fastkd.nn.MaskedLinear (forward, dX, dW).
//
// Shapes (all row-major / contiguous; the launchers make them so):
//   X  (M, K)   activations            W, Mask (N, K)   weight and its bool keep-mask
//   Y  (M, N)   Y  = X (W o Mask)^T + b                       -> fastkd::masked_mm
//   dX (M, K)   dX = dY (W o Mask)                            -> fastkd::masked_mm_grad_input
//   dW (N, K)   dW = (dY^T X) o Mask                          -> fastkd::masked_mm_grad_weight
// bf16 or fp16 in and out, fp32 accumulation on tensor cores (WMMA 16x16x16, sm_80+).
//
// The tile map (built in Python by fastkd.reference.masked_linear.build_tile_map, one int32 tensor)
// describes the mask on a grid of TILE x TILE weight tiles (n_tiles = ceil(N/TILE) tile-rows,
// k_tiles = ceil(K/TILE) tile-columns):
//   [kind    : n_tiles*k_tiles]  0 = no kept entry, 1 = partly kept, 2 = every in-bounds entry kept
//   [row_ptr : n_tiles + 1    ]  CSR over tile-rows: non-empty tiles of tile-row tn are
//   [col_ptr : k_tiles + 1    ]      row_idx[row_ptr[tn] .. row_ptr[tn+1]) (their tile-columns)
//   [row_idx : n_tiles*k_tiles]  CSC over tile-columns: non-empty tiles of tile-column tk are
//   [col_idx : n_tiles*k_tiles]      col_idx[col_ptr[tk] .. col_ptr[tk+1]) (their tile-rows)
//   [...                      ]  lists for the Triton kernels (fastkd.reference.masked_linear.
//                                 TileMapLayout), not read here
// row_idx and col_idx hold nnz entries each, padded to n_tiles*k_tiles so that every offset
// follows from the shape alone.
// Empty tiles are skipped entirely; the mask is read (elementwise) only inside partly kept tiles,
// so any mask is computed exactly and the speed grows with block structure.
//
// Every CTA computes one TILE x TILE output tile with 4 warps; the reduction walks TILE-wide slices,
// staged through shared memory with bounds checks (zeros outside the matrix), so any M, N, K works.
// The code is deliberately plain (no cp.async, no pipelining): correctness first, then tuning on a GPU.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <optional>

namespace fastkd_masked {

namespace wmma = nvcuda::wmma;

constexpr int TILE = 64;      // tile-map granularity == CTA output tile == reduction slice
constexpr int THREADS = 128;  // 4 warps; warp w owns the 32x32 quarter (w / 2, w % 2)
constexpr int LDS = TILE + 8; // smem stride (elements) of the 16-bit tiles: WMMA wants a multiple of 8
constexpr int LDC = TILE + 4; // smem stride of the fp32 staging tile: WMMA wants a multiple of 4

enum TileKind : int { kEmpty = 0, kPartial = 1, kFull = 2 };

struct TileMap {
  const int* kind;     // [n_tiles][k_tiles]
  const int* row_ptr;  // [n_tiles + 1]
  const int* col_ptr;  // [k_tiles + 1]
  const int* row_idx;  // [nnz] tile-column of each non-empty tile, grouped by tile-row
  const int* col_idx;  // [nnz] tile-row of each non-empty tile, grouped by tile-column
  int n_tiles;
  int k_tiles;
};

template <typename T>
struct Num;
template <>
struct Num<__half> {
  static __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// S[r][c] = src(row0 + r, col0 + c) for r, c < TILE, where src(gr, gc) = ptr[gr*s_row + gc*s_col].
// Entries outside [0, rows) x [0, cols) read as 0 (the tails). With `mask` (same layout and strides
// as `ptr`), an entry whose mask is false reads as 0. Consecutive threads walk the dimension whose
// stride is 1 so global reads coalesce.
template <typename T>
__device__ __forceinline__ void load_tile(T (*S)[LDS], const T* __restrict__ ptr,
                                          const bool* __restrict__ mask, int64_t s_row,
                                          int64_t s_col, int64_t row0, int64_t col0, int64_t rows,
                                          int64_t cols) {
  const bool rows_contiguous = (s_row == 1 && s_col != 1);
  const T zero = Num<T>::from_float(0.f);
  for (int e = threadIdx.x; e < TILE * TILE; e += THREADS) {
    const int r = rows_contiguous ? (e % TILE) : (e / TILE);
    const int c = rows_contiguous ? (e / TILE) : (e % TILE);
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + c;
    T v = zero;
    if (gr < rows && gc < cols) {
      const int64_t off = gr * s_row + gc * s_col;
      v = ptr[off];
      if (mask != nullptr && !mask[off]) v = zero;
    }
    S[r][c] = v;
  }
}

// acc += As (TILE x TILE) @ Bs (TILE x TILE), each warp on its 32x32 quarter of the output tile.
template <typename T>
__device__ __forceinline__ void mma_tile(const T (*As)[LDS], const T (*Bs)[LDS], Acc (&acc)[2][2]) {
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32;  // first output row of this warp's quarter
  const int wc = (warp % 2) * 32;  // first output column
#pragma unroll
  for (int kk = 0; kk < TILE; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wr + 16 * i][kk], LDS);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[kk][wc + 16 * j], LDS);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

__device__ __forceinline__ void zero_acc(Acc (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
}

// out[gr*ld + gc] = acc(gr - row0, gc - col0) (+ bias[gc]) for in-bounds (gr, gc), staged through
// Cs. With `out_mask` (same layout as out) a false entry is written as exactly 0.
template <typename T>
__device__ __forceinline__ void store_tile(float (*Cs)[LDC], Acc (&acc)[2][2], T* __restrict__ out,
                                           int64_t ld, int64_t row0, int64_t col0, int64_t rows,
                                           int64_t cols, const T* __restrict__ bias,
                                           const bool* __restrict__ out_mask) {
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32;
  const int wc = (warp % 2) * 32;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wr + 16 * i][wc + 16 * j], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < TILE * TILE; e += THREADS) {
    const int r = e / TILE;
    const int c = e % TILE;
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + c;
    if (gr < rows && gc < cols) {
      float v = Cs[r][c];
      if (bias != nullptr) v += Num<T>::to_float(bias[gc]);
      const int64_t off = gr * ld + gc;
      if (out_mask != nullptr && !out_mask[off]) v = 0.f;
      out[off] = Num<T>::from_float(v);
    }
  }
}

struct __align__(128) SmemTiles16 {
  // Raw bytes so one struct serves both 16-bit element types; cast in the kernels.
  unsigned char a[TILE * LDS * 2];
  unsigned char b[TILE * LDS * 2];
  float c[TILE * LDC];
};

#define FASTKD_SMEM_VIEWS(T)                                                   \
  __shared__ SmemTiles16 smem;                                                 \
  T(*As)[LDS] = reinterpret_cast<T(*)[LDS]>(smem.a);                           \
  T(*Bs)[LDS] = reinterpret_cast<T(*)[LDS]>(smem.b);                           \
  float(*Cs)[LDC] = reinterpret_cast<float(*)[LDC]>(smem.c)

// Y = X (W o Mask)^T + bias.  grid = (ceil(M / TILE), n_tiles); CTA (bm, tn) computes
// Y[bm*TILE.., tn*TILE..] walking only the non-empty tiles of weight tile-row tn (CSR).
//   A(i = m, r = k) = X[m*K + k]         (row stride K, column stride 1)
//   B(r = k, j = n) = W[n*K + k]         (row stride 1, column stride K), mask alike
template <typename T>
__global__ void __launch_bounds__(THREADS)
    masked_mm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                         const bool* __restrict__ mask, const T* __restrict__ bias, T* __restrict__ y,
                         TileMap tm, int64_t M, int64_t N, int64_t K) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass parses the body too
  FASTKD_SMEM_VIEWS(T);
  const int64_t m0 = int64_t(blockIdx.x) * TILE;
  const int tn = blockIdx.y;
  const int64_t n0 = int64_t(tn) * TILE;
  Acc acc[2][2];
  zero_acc(acc);
  for (int p = tm.row_ptr[tn]; p < tm.row_ptr[tn + 1]; ++p) {
    const int tk = tm.row_idx[p];
    const int64_t k0 = int64_t(tk) * TILE;
    const bool partial = tm.kind[int64_t(tn) * tm.k_tiles + tk] == kPartial;
    load_tile<T>(As, x, nullptr, K, 1, m0, k0, M, K);
    load_tile<T>(Bs, w, partial ? mask : nullptr, 1, K, k0, n0, K, N);
    __syncthreads();
    mma_tile<T>(As, Bs, acc);
    __syncthreads();  // before the next slice overwrites As/Bs
  }
  store_tile<T>(Cs, acc, y, N, m0, n0, M, N, bias, nullptr);
#else
  __trap();  // tensor-core bf16/fp16 WMMA needs sm_80+; the launcher refuses older GPUs first
#endif
}

// dX = dY (W o Mask).  grid = (ceil(M / TILE), k_tiles); CTA (bm, tk) computes dX[bm*TILE.., tk*TILE..]
// walking only the non-empty tiles of weight tile-column tk (CSC, the transposed map).
//   A(i = m, r = n) = dY[m*N + n]        (row stride N, column stride 1)
//   B(r = n, j = k) = W[n*K + k]         (row stride K, column stride 1), mask alike
template <typename T>
__global__ void __launch_bounds__(THREADS)
    masked_mm_grad_input_kernel(const T* __restrict__ dy, const T* __restrict__ w,
                                const bool* __restrict__ mask, T* __restrict__ dx, TileMap tm,
                                int64_t M, int64_t N, int64_t K) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass parses the body too
  FASTKD_SMEM_VIEWS(T);
  const int64_t m0 = int64_t(blockIdx.x) * TILE;
  const int tk = blockIdx.y;
  const int64_t k0 = int64_t(tk) * TILE;
  Acc acc[2][2];
  zero_acc(acc);
  for (int p = tm.col_ptr[tk]; p < tm.col_ptr[tk + 1]; ++p) {
    const int tn = tm.col_idx[p];
    const int64_t n0 = int64_t(tn) * TILE;
    const bool partial = tm.kind[int64_t(tn) * tm.k_tiles + tk] == kPartial;
    load_tile<T>(As, dy, nullptr, N, 1, m0, n0, M, N);
    load_tile<T>(Bs, w, partial ? mask : nullptr, K, 1, n0, k0, N, K);
    __syncthreads();
    mma_tile<T>(As, Bs, acc);
    __syncthreads();
  }
  store_tile<T>(Cs, acc, dx, K, m0, k0, M, K, nullptr, nullptr);
#else
  __trap();
#endif
}

// dW = (dY^T X) o Mask, a sampled product: grid = (k_tiles, n_tiles); CTA (tk, tn) owns weight tile
// (tn, tk). An empty tile only writes zeros; a kept tile reduces over all of M in TILE slices.
//   A(i = n, r = m) = dY[m*N + n]        (row stride 1, column stride N)
//   B(r = m, j = k) = X[m*K + k]         (row stride K, column stride 1)
template <typename T>
__global__ void __launch_bounds__(THREADS)
    masked_mm_grad_weight_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                 const bool* __restrict__ mask, T* __restrict__ dw, TileMap tm,
                                 int64_t M, int64_t N, int64_t K) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass parses the body too
  const int tk = blockIdx.x;
  const int tn = blockIdx.y;
  const int64_t k0 = int64_t(tk) * TILE;
  const int64_t n0 = int64_t(tn) * TILE;
  const int kind = tm.kind[int64_t(tn) * tm.k_tiles + tk];  // uniform across the CTA
  if (kind == kEmpty) {
    const T zero = Num<T>::from_float(0.f);
    for (int e = threadIdx.x; e < TILE * TILE; e += THREADS) {
      const int64_t gr = n0 + e / TILE;
      const int64_t gc = k0 + e % TILE;
      if (gr < N && gc < K) dw[gr * K + gc] = zero;
    }
    return;
  }
  FASTKD_SMEM_VIEWS(T);
  Acc acc[2][2];
  zero_acc(acc);
  for (int64_t m0 = 0; m0 < M; m0 += TILE) {
    load_tile<T>(As, dy, nullptr, 1, N, n0, m0, N, M);
    load_tile<T>(Bs, x, nullptr, K, 1, m0, k0, M, K);
    __syncthreads();
    mma_tile<T>(As, Bs, acc);
    __syncthreads();
  }
  store_tile<T>(Cs, acc, dw, K, n0, k0, N, K, nullptr, kind == kPartial ? mask : nullptr);
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "fastkd masked_mm: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "fastkd masked_mm: ", name, " is on ", t.device(),
              " but expected ", like.device());
}

void check_half(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_operand(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "fastkd masked_mm: ", name, " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastkd masked_mm: ", name, " has dtype ",
              t.scalar_type(), " but expected ", like.scalar_type());
}

void check_sm80(const at::Tensor& t) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.get_device());
  TORCH_CHECK(prop->major >= 8, "fastkd masked_mm needs a GPU of compute capability 8.0 or newer, got ",
              prop->major, ".", prop->minor);
}

// Validates the weight/mask/tile map triple and returns device pointers into the tile map.
TileMap view_tile_map(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& tile_map) {
  TORCH_CHECK(weight.dim() == 2, "fastkd masked_mm: weight must be 2-D (N, K)");
  TORCH_CHECK(mask.sizes() == weight.sizes(), "fastkd masked_mm: mask shape ", mask.sizes(),
              " must equal weight shape ", weight.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "fastkd masked_mm: mask must be bool");
  check_operand(mask, "mask", weight);
  check_operand(tile_map, "tile_map", weight);
  TORCH_CHECK(tile_map.scalar_type() == at::kInt && tile_map.dim() == 1 && tile_map.is_contiguous(),
              "fastkd masked_mm: tile_map must be a contiguous 1-D int32 tensor");
  const int64_t nt = ceil_div(weight.size(0), TILE);
  const int64_t kt = ceil_div(weight.size(1), TILE);
  TORCH_CHECK(nt <= 65535 && kt <= 65535, "fastkd masked_mm: weight too large for the tile grid");
  // The sections read here (kind, row_ptr, col_ptr, padded row_idx and col_idx); the Triton
  // lists that follow make the map longer.
  const int64_t needed = 3 * nt * kt + nt + 1 + kt + 1;
  TORCH_CHECK(tile_map.numel() >= needed,
              "fastkd masked_mm: tile_map of ", tile_map.numel(), " entries does not match a ",
              weight.size(0), "x", weight.size(1), " weight with ", TILE, "x", TILE,
              " tiles; rebuild it with fastkd.reference.masked_linear.build_tile_map");
  const int* base = tile_map.data_ptr<int>();
  TileMap tm;
  tm.kind = base;
  tm.row_ptr = base + nt * kt;
  tm.col_ptr = tm.row_ptr + nt + 1;
  tm.row_idx = tm.col_ptr + kt + 1;
  tm.col_idx = tm.row_idx + nt * kt;
  tm.n_tiles = static_cast<int>(nt);
  tm.k_tiles = static_cast<int>(kt);
  return tm;
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// fastkd::masked_mm(Tensor x, Tensor weight, Tensor mask, Tensor? bias, Tensor tile_map) -> Tensor
at::Tensor masked_mm_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                          const at::Tensor& mask_in, const std::optional<at::Tensor>& bias_in,
                          const at::Tensor& tile_map) {
  TORCH_CHECK(x_in.dim() == 2, "fastkd masked_mm: x must be 2-D (M, K)");
  check_half(weight_in, "weight", x_in);
  check_half(x_in, "x", x_in);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(1),
              "fastkd masked_mm: x (M, K) and weight (N, K) disagree on K: ", x_in.sizes(), " vs ",
              weight_in.sizes());
  const at::cuda::CUDAGuard guard(x_in.device());
  const TileMap tm = view_tile_map(weight_in, mask_in, tile_map);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    check_half(bias, "bias", x_in);
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0),
                "fastkd masked_mm: bias must have shape (N,) = (", weight.size(0), ",)");
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  check_sm80(x);
  TORCH_CHECK(ceil_div(M, TILE) <= INT32_MAX, "fastkd masked_mm: too many rows");
  const dim3 grid(static_cast<unsigned>(ceil_div(M, TILE)), static_cast<unsigned>(tm.n_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    masked_mm_fwd_kernel<__half><<<grid, THREADS, 0, stream>>>(
        cptr<__half>(x), cptr<__half>(weight), mask.data_ptr<bool>(),
        bias.defined() ? cptr<__half>(bias) : nullptr, mptr<__half>(y), tm, M, N, K);
  } else {
    masked_mm_fwd_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
        cptr<__nv_bfloat16>(x), cptr<__nv_bfloat16>(weight), mask.data_ptr<bool>(),
        bias.defined() ? cptr<__nv_bfloat16>(bias) : nullptr, mptr<__nv_bfloat16>(y), tm, M, N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// fastkd::masked_mm_grad_input(Tensor grad_out, Tensor weight, Tensor mask, Tensor tile_map) -> Tensor
at::Tensor masked_mm_grad_input_cuda(const at::Tensor& grad_in, const at::Tensor& weight_in,
                                     const at::Tensor& mask_in, const at::Tensor& tile_map) {
  TORCH_CHECK(grad_in.dim() == 2, "fastkd masked_mm_grad_input: grad_out must be 2-D (M, N)");
  check_half(grad_in, "grad_out", grad_in);
  check_half(weight_in, "weight", grad_in);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == grad_in.size(1),
              "fastkd masked_mm_grad_input: grad_out (M, N) and weight (N, K) disagree on N");
  const at::cuda::CUDAGuard guard(grad_in.device());
  const TileMap tm = view_tile_map(weight_in, mask_in, tile_map);
  const at::Tensor dy = grad_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1), K = weight.size(1);
  at::Tensor dx = at::empty({M, K}, dy.options());
  if (M == 0 || K == 0) return dx;
  check_sm80(dy);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, TILE)), static_cast<unsigned>(tm.k_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (dy.scalar_type() == at::kHalf) {
    masked_mm_grad_input_kernel<__half><<<grid, THREADS, 0, stream>>>(
        cptr<__half>(dy), cptr<__half>(weight), mask.data_ptr<bool>(), mptr<__half>(dx), tm, M, N, K);
  } else {
    masked_mm_grad_input_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
        cptr<__nv_bfloat16>(dy), cptr<__nv_bfloat16>(weight), mask.data_ptr<bool>(),
        mptr<__nv_bfloat16>(dx), tm, M, N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

// fastkd::masked_mm_grad_weight(Tensor grad_out, Tensor x, Tensor mask, Tensor tile_map) -> Tensor
at::Tensor masked_mm_grad_weight_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                      const at::Tensor& mask_in, const at::Tensor& tile_map) {
  TORCH_CHECK(grad_in.dim() == 2 && x_in.dim() == 2,
              "fastkd masked_mm_grad_weight: grad_out (M, N) and x (M, K) must be 2-D");
  check_half(grad_in, "grad_out", grad_in);
  check_half(x_in, "x", grad_in);
  TORCH_CHECK(grad_in.size(0) == x_in.size(0),
              "fastkd masked_mm_grad_weight: grad_out and x disagree on M");
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == grad_in.size(1) &&
                  mask_in.size(1) == x_in.size(1),
              "fastkd masked_mm_grad_weight: mask must have shape (N, K)");
  check_operand(mask_in, "mask", grad_in);
  const at::cuda::CUDAGuard guard(grad_in.device());
  // The mask has the weight's shape, so it stands in for the weight in the tile-map checks.
  const TileMap tm = view_tile_map(mask_in, mask_in, tile_map);
  const at::Tensor dy = grad_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  at::Tensor dw = at::empty({N, K}, dy.options());
  if (N == 0 || K == 0) return dw;
  check_sm80(dy);
  const dim3 grid(static_cast<unsigned>(tm.k_tiles), static_cast<unsigned>(tm.n_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (dy.scalar_type() == at::kHalf) {
    masked_mm_grad_weight_kernel<__half><<<grid, THREADS, 0, stream>>>(
        cptr<__half>(dy), cptr<__half>(x), mask.data_ptr<bool>(), mptr<__half>(dw), tm, M, N, K);
  } else {
    masked_mm_grad_weight_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
        cptr<__nv_bfloat16>(dy), cptr<__nv_bfloat16>(x), mask.data_ptr<bool>(),
        mptr<__nv_bfloat16>(dw), tm, M, N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dw;
}

}  // namespace fastkd_masked

// The schemas are defined in Python (fastkd/_ops.py); this only adds the CUDA implementations.
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("masked_mm", &fastkd_masked::masked_mm_cuda);
  m.impl("masked_mm_grad_input", &fastkd_masked::masked_mm_grad_input_cuda);
  m.impl("masked_mm_grad_weight", &fastkd_masked::masked_mm_grad_weight_cuda);
}
