// Rotary position embedding in place, transformers' rotate_half convention: for the pair (i, i + hd/2) of a
// head at position p, with c = cos[p, i], s = sin[p, i] (tables (positions, hd/2) f32):
//   forward:  (a, b) -> (a*c - b*s, b*c + a*s)
//   backward: the inverse rotation, (a, b) -> (a*c + b*s, b*c - a*s): the gradient of a rotation is rotated back.
// x (rows, heads, hd) f32, pos (rows) u32, each < max_pos (the tables' rows; a position past them gives
// NaN, never a read out of bounds); one thread per pair.

__device__ __forceinline__ void rope_apply(float* x, const u32* pos, const float* cosv, const float* sinv, u32 rows, u32 heads, u32 hd,
                                           u32 max_pos, float sign) {
    const u32 half = hd / 2;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * heads * half) return;
    const u32 k = (u32)(i % half);
    const u64 rh = i / half;  // row * heads + head
    const u32 r = (u32)(rh / heads);
    float* v = x + rh * hd;
    if (pos[r] >= max_pos) {
        v[k] = LORA_NAN;
        v[k + half] = LORA_NAN;
        return;
    }
    const u64 t = (u64)pos[r] * half + k;
    const float c = cosv[t], s = sign * sinv[t];
    const float a = v[k], b = v[k + half];
    v[k] = a * c - b * s;
    v[k + half] = b * c + a * s;
}

extern "C" __global__ void rope_fwd(float* x, const u32* __restrict__ pos, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                    u32 rows, u32 heads, u32 hd, u32 max_pos) {
    rope_apply(x, pos, cosv, sinv, rows, heads, hd, max_pos, 1.0f);
}

extern "C" __global__ void rope_bwd(float* x, const u32* __restrict__ pos, const float* __restrict__ cosv, const float* __restrict__ sinv,
                                    u32 rows, u32 heads, u32 hd, u32 max_pos) {
    rope_apply(x, pos, cosv, sinv, rows, heads, hd, max_pos, -1.0f);
}
