// common.cuh: prepended to every kernel file, by NVRTC (compile.rs) and by the CPU emulation (emu/), so the
// kernels need no CUDA header. bf16 values are their 16 bits (uint16): the top half of an f32.
// Reductions: blockDim.x a multiple of 32 (at most 1024); every thread of the block calls them (they hold
// __syncthreads), and every thread gets the same, deterministic result.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#define LORA_INF __uint_as_float(0x7f800000u)
#define LORA_NAN __uint_as_float(0x7fc00000u)

// bf16 -> f32: exact.
__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

// f32 -> bf16, rounded to nearest, ties to even; NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Butterfly sums over the 32 lanes of a warp: every lane ends with the same bits.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The sum of `v` over the block; `scratch` is a __shared__ float[32] of the calling kernel.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31u, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    return warp_sum(lane < nw ? scratch[lane] : 0.0f);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31u, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    return warp_max(lane < nw ? scratch[lane] : -LORA_INF);
}
