//! Strided, bounds-checked f32 matrix views: element (i, j) of a `rows × cols` view is `data[i·rs + j·cs]`,
//! so a transpose is a view with the strides swapped (no copy). Every element of a view lies inside its
//! slice (checked, without overflow, on construction), which is what lets the kernels read through raw
//! pointers.

use crate::error::{bail, Result};

/// A read-only, strided f32 matrix view: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `rows × cols` elements with row stride `rs` and column stride `cs`; every element must
    /// lie inside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        // Checked arithmetic: a wrapped bound would let a view reach outside `data` in the kernels.
        let last = (rows.max(1) - 1).checked_mul(rs).zip((cols.max(1) - 1).checked_mul(cs)).and_then(|(a, b)| a.checked_add(b));
        if rows > 0 && cols > 0 && last.is_none_or(|last| last >= data.len()) {
            bail!("matrix view {rows}x{cols} (strides {rs}, {cs}) does not fit in {} values", data.len())
        }
        Ok(MatRef { data, rows, cols, rs, cs })
    }
    /// A contiguous row-major view.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            // Not rows·cols in the message: it may overflow.
            bail!("row-major matrix {rows}x{cols} does not fit its {} values", data.len())
        }
        Self::new(data, rows, cols, cols, 1)
    }
    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// Rows `r0..r1` of the view (no copy).
    pub fn row_range(self, r0: usize, r1: usize) -> Result<Self> {
        if r0 > r1 || r1 > self.rows {
            bail!("rows {r0}..{r1} of a {}-row matrix view", self.rows)
        }
        if r0 == r1 {
            return Ok(MatRef { data: &self.data[..0], rows: 0, ..self });
        }
        Ok(MatRef { data: &self.data[r0 * self.rs..], rows: r1 - r0, ..self })
    }
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub(crate) fn is_row_major(&self) -> bool {
        self.cs == 1 && (self.rs == self.cols || self.rows <= 1)
    }
    /// The values as one row-major slice when the view is contiguous.
    pub(crate) fn contiguous(&self) -> Option<&'a [f32]> {
        self.is_row_major().then(|| &self.data[..self.rows * self.cols])
    }
    pub(crate) fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}
