// Casts between bf16 and f32 over n values (grid-stride loop): bf16 -> f32 exact, f32 -> bf16 rounded to
// nearest even.

extern "C" __global__ void cast_bf16_to_f32(const bf16_t* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) y[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) y[i] = f32_to_bf16(x[i]);
}
