//! The one bridge from candle tensors to `lora-kernels`: a CPU tensor's values seen in place (no copy) as
//! the kernels' strided matrix view or as a contiguous slice. Every fused op of the workspace reads its
//! operands through it (this crate's layer and mixed batches, `lora-train`'s and `lora-lm`'s ops).
//!
//! ```text
//! Held::new(&t)       read lock on t's storage:  .mat()    → MatRef, (rows, cols) any strides   (2-D)
//!                                                .slice()  → &[f32], the elements in order     (contiguous)
//!                                                .values::<T>() → &[T] (u32 labels, …)          (contiguous)
//! with_slice(&t, f)   f(&[f32]) on t made contiguous first (a copy only when it is not)
//! cpu_mat(s, l)       a custom op's (CpuStorage, Layout) → MatRef                               (2-D)
//! cpu_slice(s, l)     a custom op's (CpuStorage, Layout) → &[T]                                 (contiguous)
//! ```
//!
//! A view covers exactly the layout's elements from its start offset. Its bounds are checked (by
//! `MatRef::new` for strided views, by a checked slice range for contiguous ones), so a layout that does
//! not fit its storage is an error, never a read outside it. Errors are candle's (custom ops answer in
//! them); callers add their op's name with `Error::context`.

use candle_core::{CpuStorage, Layout, Storage, StorageRef, Tensor, WithDType};
use lora_kernels::MatRef;

type CResult<T> = candle_core::Result<T>;

/// A read lock on a tensor's storage, to view its values as a matrix or a slice without copying them.
/// Hold it no longer than the views: an in-place op on the tensor (an optimizer step) waits for it.
pub struct Held<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Held<'a> {
    /// Locks `t`'s storage for reading.
    pub fn new(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Held { storage, layout }
    }
    fn cpu(&self) -> CResult<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(c) => Ok(c),
            _ => candle_core::bail!("the fused kernels run on the CPU only"),
        }
    }
    /// A 2-D f32 tensor as a strided matrix, (rows, cols) with the tensor's strides.
    pub fn mat(&self) -> CResult<MatRef<'_>> {
        cpu_mat(self.cpu()?, self.layout)
    }
    /// A contiguous f32 tensor's values, in order.
    pub fn slice(&self) -> CResult<&[f32]> {
        self.values()
    }
    /// A contiguous tensor's values of type `T` (its dtype), in order.
    pub fn values<T: WithDType>(&self) -> CResult<&[T]> {
        cpu_slice(self.cpu()?, self.layout)
    }
}

/// `f` on the f32 values of `t` made contiguous first (copied only when it is not).
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    let t = t.contiguous()?;
    let held = Held::new(&t);
    f(held.slice()?)
}

/// A custom op's 2-D f32 input as a strided matrix.
pub fn cpu_mat<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<MatRef<'a>> {
    let data = s.as_slice::<f32>()?.get(l.start_offset()..).unwrap_or(&[]);
    match (l.dims(), l.stride()) {
        ([r, c], [rs, cs]) => MatRef::new(data, *r, *c, *rs, *cs).map_err(candle_core::Error::wrap),
        (d, _) => candle_core::bail!("the fused kernels need a 2-D tensor, got shape {d:?}"),
    }
}

/// A custom op's contiguous input as its values of type `T`, in order (exactly the layout's elements).
pub fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("the fused kernels need a contiguous tensor, got shape {:?} with strides {:?}", l.dims(), l.stride())
    };
    let data = s.as_slice::<T>()?;
    match data.get(start..end) {
        Some(v) => Ok(v),
        None => candle_core::bail!("a layout of {} values from offset {start} does not fit its storage of {}", end - start, data.len()),
    }
}

/// Every value of `t` as f32, flat (a copy; for packing and checks, not for the kernels' hot paths).
pub(crate) fn values(t: &Tensor) -> crate::Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_transposed_or_narrowed_tensor_is_viewed_in_place_with_its_strides() {
        let x = t((0..12).map(|v| v as f32).collect(), (3, 4));
        let xt = x.t().unwrap(); // (4, 3), strides (1, 4)
        let held = Held::new(&xt);
        let m = held.mat().unwrap();
        assert_eq!((m.rows(), m.cols()), (4, 3));
        // A product through the view reads element (i, j) = x[j][i]: (xᵀ)·e_j is column j of xᵀ.
        let mut y = [0f32; 4];
        let e1 = [0f32, 1.0, 0.0];
        lora_kernels::matmul_into(&mut y, m, MatRef::row_major(&e1, 3, 1).unwrap(), 1.0, false).unwrap();
        assert_eq!(y, [4.0, 5.0, 6.0, 7.0]);
        // A narrowed tensor starts at its offset; a strided one is no slice.
        let rows = x.narrow(0, 1, 2).unwrap();
        assert_eq!(Held::new(&rows).slice().unwrap(), &[4., 5., 6., 7., 8., 9., 10., 11.]);
        let e = held.slice().unwrap_err().to_string();
        assert!(e.contains("contiguous") && e.contains("[1, 4]"), "{e}");
        assert_eq!(with_slice(&xt, |v| Ok(v.to_vec())).unwrap(), [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
    }

    #[test]
    fn other_dtypes_shapes_and_devices_are_refused_by_name() {
        let labels = Tensor::from_vec(vec![3u32, 1, 4], 3, &Device::Cpu).unwrap();
        assert_eq!(Held::new(&labels).values::<u32>().unwrap(), &[3, 1, 4]);
        assert!(Held::new(&labels).slice().is_err(), "u32 values are not f32");
        let v = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        let e = Held::new(&v).mat().unwrap_err().to_string();
        assert!(e.contains("2-D") && e.contains("[5]"), "{e}");
    }
}
