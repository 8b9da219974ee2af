// RMSNorm over rows of h features (Llama's: y = w * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps)).
//   forward:  x (rows, h) f32, w (h) bf16 -> y (rows, h) bf16 (the next product's input), rstd (rows) f32
//   backward: with xh = x * rstd and g = dy * w:
//             dx = rstd * (g - xh * mean(g * xh))          (rows, h) f32, written or added (accumulate != 0)
//             dw = sum over rows of dy * xh                 per column, in two deterministic passes:
//                  rmsnorm_dw_partial (chunks of rows) then sum_chunks.
// One block per row for the forward and dx; blockDim.x a multiple of 32.

extern "C" __global__ void rmsnorm_fwd(const float* __restrict__ x, const bf16_t* __restrict__ w, bf16_t* __restrict__ y,
                                       float* __restrict__ rstd, u32 rows, u32 h, float eps) {
    __shared__ float scratch[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;  // the same for the whole block
    const float* xr = x + (u64)r * h;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < h; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    const float rs = 1.0f / sqrtf(ss / (float)h + eps);
    bf16_t* yr = y + (u64)r * h;
    for (u32 c = threadIdx.x; c < h; c += blockDim.x) yr[c] = f32_to_bf16(bf16_to_f32(w[c]) * (xr[c] * rs));
    if (threadIdx.x == 0) rstd[r] = rs;
}

extern "C" __global__ void rmsnorm_bwd_dx(const float* __restrict__ x, const bf16_t* __restrict__ w, const float* __restrict__ rstd,
                                          const float* __restrict__ dy, float* __restrict__ dx, u32 rows, u32 h, u32 accumulate) {
    __shared__ float scratch[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;  // the same for the whole block
    const float* xr = x + (u64)r * h;
    const float* dyr = dy + (u64)r * h;
    const float rs = rstd[r];
    float dot = 0.0f;
    for (u32 c = threadIdx.x; c < h; c += blockDim.x) dot += dyr[c] * bf16_to_f32(w[c]) * (xr[c] * rs);
    dot = block_sum(dot, scratch);
    const float mean = dot / (float)h;
    float* dxr = dx + (u64)r * h;
    for (u32 c = threadIdx.x; c < h; c += blockDim.x) {
        const float v = rs * (dyr[c] * bf16_to_f32(w[c]) - (xr[c] * rs) * mean);
        dxr[c] = accumulate ? dxr[c] + v : v;
    }
}

// partial[chunk, c] = sum over the chunk's rows of dy * x * rstd; grid (ceil(h / blockDim.x), chunks).
extern "C" __global__ void rmsnorm_dw_partial(const float* __restrict__ x, const float* __restrict__ rstd, const float* __restrict__ dy,
                                              float* __restrict__ partial, u32 rows, u32 h, u32 rows_per_chunk) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    const u32 r0 = blockIdx.y * rows_per_chunk;
    const u32 r1 = min(r0 + rows_per_chunk, rows);
    float s = 0.0f;
    for (u32 r = r0; r < r1; ++r) s += dy[(u64)r * h + c] * (x[(u64)r * h + c] * rstd[r]);
    partial[(u64)blockIdx.y * h + c] = s;
}

// out[c] (+)= sum over chunks of partial[chunk, c]; one thread per column.
extern "C" __global__ void sum_chunks(const float* __restrict__ partial, float* __restrict__ out, u32 chunks, u32 h, u32 accumulate) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= h) return;
    float s = 0.0f;
    for (u32 k = 0; k < chunks; ++k) s += partial[(u64)k * h + c];
    out[c] = accumulate ? out[c] + s : s;
}
