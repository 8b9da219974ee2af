// SwiGLU: h = silu(g) * u, silu(g) = g * sigmoid(g); g, u (n) f32 (the gate and up products).
//   forward:  h as bf16 (the down product's input)
//   backward: dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du = dh * silu(g)   (f32)

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_fwd(const float* __restrict__ g, const float* __restrict__ u, bf16_t* __restrict__ h, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = g[i];
        h[i] = f32_to_bf16(gi * sigmoidf(gi) * u[i]);
    }
}

extern "C" __global__ void swiglu_bwd(const float* __restrict__ g, const float* __restrict__ u, const float* __restrict__ dh,
                                      float* __restrict__ dg, float* __restrict__ du, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = g[i], s = sigmoidf(gi), d = dh[i];
        dg[i] = d * u[i] * s * (1.0f + gi * (1.0f - s));
        du[i] = d * gi * s;
    }
}
