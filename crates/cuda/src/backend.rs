//! `Backend`: where kernels run — memory (allocate, upload, download, an address per buffer) and launches.
//! The GPU is one (`Gpu`); the tests' CPU emulation is the other. `DeviceVec<B, T>` is a typed buffer of a
//! backend, whose length the safe `ops` check against each kernel's shape.

use std::marker::PhantomData;

use crate::error::CudaError;
use crate::launch::Launch;

/// Element types of device buffers (plain bits: `bytemuck::Pod`).
pub trait Elem: bytemuck::Pod + Default {}
impl Elem for f32 {}
impl Elem for u16 {}
impl Elem for u32 {}
impl Elem for i32 {}
impl Elem for u64 {}

/// A place kernels run.
///
/// # Safety
/// An implementation promises that `address(buf)` is an address its launched kernels can read and write
/// for `byte_len(buf)` bytes while `buf` lives, aligned to at least 8 bytes, and that `launch` runs the
/// named kernel with exactly the arguments given. The safe functions of `ops` rely on this.
pub unsafe trait Backend {
    /// A buffer of bytes.
    type Buffer;
    /// The backend's name (for reports).
    fn name(&self) -> String;
    /// A zeroed buffer of `bytes` bytes.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buffer, CudaError>;
    /// A buffer holding `bytes`.
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buffer, CudaError>;
    /// Copies the buffer into `out` (as many bytes as the buffer holds), after all launched work.
    fn download(&self, buffer: &Self::Buffer, out: &mut [u8]) -> Result<(), CudaError>;
    /// The buffer's address for kernels.
    fn address(&self, buffer: &Self::Buffer) -> u64;
    /// The buffer's size in bytes.
    fn byte_len(&self, buffer: &Self::Buffer) -> usize;
    /// Runs a launch.
    ///
    /// # Safety
    /// The launch's pointer arguments must be addresses of this backend's live buffers, large enough for
    /// every access the kernel makes given its other arguments.
    unsafe fn launch(&self, launch: &mut Launch) -> Result<(), CudaError>;
    /// Waits for all launched work.
    fn synchronize(&self) -> Result<(), CudaError>;
}

/// A typed buffer of `len` values of `T` on backend `B`.
pub struct DeviceVec<B: Backend, T: Elem> {
    buffer: B::Buffer,
    len: usize,
    _t: PhantomData<T>,
}

impl<B: Backend, T: Elem> DeviceVec<B, T> {
    /// `len` zeros.
    pub fn zeros(b: &B, len: usize) -> Result<Self, CudaError> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| CudaError::shape("alloc", format!("{len} values overflow")))?;
        Ok(DeviceVec { buffer: b.alloc_zeroed(bytes.max(8))?, len, _t: PhantomData })
    }

    /// A copy of `values`.
    pub fn upload(b: &B, values: &[T]) -> Result<Self, CudaError> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let buffer = if bytes.is_empty() { b.alloc_zeroed(8)? } else { b.upload(bytes)? };
        Ok(DeviceVec { buffer, len: values.len(), _t: PhantomData })
    }

    /// The values.
    pub fn download(&self, b: &B) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); self.len];
        if self.len > 0 {
            let mut bytes = vec![0u8; self.len * size_of::<T>()];
            b.download(&self.buffer, &mut bytes)?;
            bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
        }
        Ok(out)
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address kernels see.
    pub fn address(&self, b: &B) -> u64 {
        b.address(&self.buffer)
    }

    /// The backend's buffer.
    pub fn buffer(&self) -> &B::Buffer {
        &self.buffer
    }
}
