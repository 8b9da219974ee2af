// The LoRA delta of a batch whose rows use different adapters (Punica's SGMV/BGMV): rows come in segments
// [seg_starts[s], seg_starts[s+1]), each with one adapter (seg_adapter[s], -1: none); adapter a has rank
// ranks[a] <= rmax, A_a (rank, in) and B_a (out, rank) f32 at the device addresses a_ptrs[a] / b_ptrs[a],
// and scale scales[a].
//   shrink: tmp[r, j] = x[r, :] . A_a[j, :]         x (rows, in) bf16, tmp (rows, rmax) f32 (0 past the rank)
//   expand: y[r, o] += scales[a] * tmp[r, :rank] . B_a[o, :]      y (rows, out) f32

__device__ __forceinline__ i32 row_adapter(const u32* seg_starts, const i32* seg_adapter, u32 nseg, u32 r) {
    u32 lo = 0, hi = nseg;  // the segment s with seg_starts[s] <= r < seg_starts[s + 1]
    while (hi - lo > 1) {
        const u32 mid = (lo + hi) / 2;
        if (seg_starts[mid] <= r) lo = mid; else hi = mid;
    }
    return seg_adapter[lo];
}

// One block per row; each warp takes rank indices w, w + warps, ...; lanes stride over the input features.
extern "C" __global__ void lora_shrink(const bf16_t* __restrict__ x, const u32* __restrict__ seg_starts, const i32* __restrict__ seg_adapter,
                                       u32 nseg, const u64* __restrict__ a_ptrs, const u32* __restrict__ ranks, float* __restrict__ tmp, u32 rows,
                                       u32 in_dim, u32 rmax) {
    const u32 r = blockIdx.x;
    if (r >= rows) return;  // the same for the whole block
    const i32 a = row_adapter(seg_starts, seg_adapter, nseg, r);
    const u32 rank = a < 0 ? 0u : ranks[a];
    const float* A = a < 0 ? (const float*)0 : (const float*)a_ptrs[a];
    const u32 lane = threadIdx.x & 31u, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const bf16_t* xr = x + (u64)r * in_dim;
    for (u32 j = w; j < rmax; j += nw) {
        float s = 0.0f;
        if (j < rank) {
            const float* aj = A + (u64)j * in_dim;
            for (u32 c = lane; c < in_dim; c += 32) s += bf16_to_f32(xr[c]) * aj[c];
        }
        s = warp_sum(s);
        if (lane == 0) tmp[(u64)r * rmax + j] = s;
    }
}

// grid (ceil(out / blockDim.x), rows): one thread per output value.
extern "C" __global__ void lora_expand(const float* __restrict__ tmp, const u32* __restrict__ seg_starts, const i32* __restrict__ seg_adapter,
                                       u32 nseg, const u64* __restrict__ b_ptrs, const u32* __restrict__ ranks, const float* __restrict__ scales,
                                       float* __restrict__ y, u32 rows, u32 out_dim, u32 rmax) {
    const u32 r = blockIdx.y;
    const u32 o = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows || o >= out_dim) return;
    const i32 a = row_adapter(seg_starts, seg_adapter, nseg, r);
    if (a < 0) return;
    const u32 rank = ranks[a];
    const float* bo = (const float*)b_ptrs[a] + (u64)o * rank;
    const float* t = tmp + (u64)r * rmax;
    float s = 0.0f;
    for (u32 k = 0; k < rank; ++k) s += t[k] * bo[k];
    y[(u64)r * out_dim + o] += scales[a] * s;
}
