//! Weights held as bfloat16: half the bytes of f32, for a weight whose every value is a bf16 number (a
//! checkpoint stored in bf16, as most Hugging Face checkpoints are, and loaded into f32). Widening bf16 to f32
//! is exact (the f32 bit pattern is the bf16 one followed by 16 zero bits), so a product read from a
//! [`Bf16Matrix`] computes on exactly the values of the f32 weight: the same bits, from half the memory
//! traffic.
//!
//! ```text
//! f32(v) = bits(v) << 16                                  (bf16 → f32, exact)
//! W (rows × cols): row j in stride = ⌈cols/32⌉·16 words; word 16p + i of a row holds
//!                  value 32p + i in its low half, value 32p + 16 + i in its high half (0 past cols)
//! ```
//!
//! The pairing of values 16 apart lets a kernel of L ≤ 16 lanes read L consecutive values with one load of L
//! words and one shift (low halves) or mask (high halves), on every instruction set, in the order the f32
//! kernel reads them.

/// A weight matrix (rows × cols, row-major) whose every value is a bfloat16 number, in half the bytes of f32
/// (layout in the module's doc). Built by [`Bf16Matrix::pack`]; read by [`crate::matmul_bf16_into`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bf16Matrix {
    words: Vec<u32>,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Bf16Matrix {
    /// `w` (rows × cols, row-major) in bf16, or `None` when a value is not a bf16 number (its low 16 bits are
    /// not zero) or the shape does not match `w`'s length: such a weight stays f32.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Bf16Matrix> {
        if rows.checked_mul(cols) != Some(w.len()) || w.iter().any(|v| v.to_bits() & 0xFFFF != 0) {
            return None;
        }
        let stride = cols.div_ceil(32) * 16;
        let mut words = vec![0u32; rows * stride];
        for (row, out) in w.chunks_exact(cols.max(1)).zip(words.chunks_exact_mut(stride.max(1))) {
            for (k, v) in row.iter().enumerate() {
                let (block, i) = (k / 32, k % 32);
                let half = v.to_bits() >> 16;
                out[block * 16 + i % 16] |= if i < 16 { half } else { half << 16 };
            }
        }
        Some(Bf16Matrix { words, rows, cols, stride })
    }

    /// A rows × cols matrix of zeros, to be filled by [`Bf16Matrix::write_rows`] (a file read in pieces, so
    /// that no f32 or whole bf16 copy of the weight is ever held beside it).
    pub fn zeros(rows: usize, cols: usize) -> Option<Bf16Matrix> {
        let stride = cols.div_ceil(32) * 16;
        let len = rows.checked_mul(stride)?;
        // Fails in a clear way rather than aborting on a size that cannot be held.
        let mut words = Vec::new();
        words.try_reserve_exact(len).ok()?;
        words.resize(len, 0u32);
        Some(Bf16Matrix { words, rows, cols, stride })
    }

    /// `w`'s bf16 bit patterns (rows × cols, row-major, as a safetensors file stores BF16) packed, or `None`
    /// when the shape does not match the values.
    pub fn from_bits(bits: &[u16], rows: usize, cols: usize) -> Option<Bf16Matrix> {
        if rows.checked_mul(cols) != Some(bits.len()) {
            return None;
        }
        let mut m = Bf16Matrix::zeros(rows, cols)?;
        m.write_rows(0, bits).then_some(m)
    }

    /// Overwrites rows `r0..` with `bits` (whole rows of bf16 bit patterns, row-major); `false` (and nothing
    /// written) when they are not whole rows or run past the last row.
    pub fn write_rows(&mut self, r0: usize, bits: &[u16]) -> bool {
        let cols = self.cols;
        if cols == 0 {
            return bits.is_empty() && r0 <= self.rows;
        }
        if !bits.len().is_multiple_of(cols) || r0.checked_add(bits.len() / cols).is_none_or(|end| end > self.rows) {
            return false;
        }
        for (i, row) in bits.chunks_exact(cols).enumerate() {
            let out = &mut self.words[(r0 + i) * self.stride..(r0 + i + 1) * self.stride];
            out.fill(0);
            for (k, &half) in row.iter().enumerate() {
                let (block, i) = (k / 32, k % 32);
                out[block * 16 + i % 16] |= if i < 16 { half as u32 } else { (half as u32) << 16 };
            }
        }
        true
    }

    /// Rows (a linear layer's outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (a linear layer's inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
    }

    /// Row `j`'s values in f32 (exact), into `out` (`cols` values; an embedding's lookup of token j).
    ///
    /// # Panics
    /// When `j ≥ rows` or `out` does not hold `cols` values.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        assert!(
            j < self.rows && out.len() == self.cols,
            "Bf16Matrix::row_into: row {j} of {}, {} values for {}",
            self.rows,
            out.len(),
            self.cols
        );
        self.cols_into(j, 0, out);
    }

    /// Values `c0..c0 + out.len()` of row j in f32 (in bounds: checked by the callers). Whole blocks of 32
    /// values starting on a block boundary go 16 words at a time (a loop the compiler turns into a few vector
    /// shifts and masks: widening is on the path of every product of many rows); the rest value by value.
    fn cols_into(&self, j: usize, c0: usize, out: &mut [f32]) {
        let row = &self.words[j * self.stride..(j + 1) * self.stride];
        let mut done = 0;
        if c0.is_multiple_of(32) {
            let whole = out.len() / 32 * 32;
            for (o, w) in out[..whole].chunks_exact_mut(32).zip(row[c0 / 2..].chunks_exact(16)) {
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &w) in lo.iter_mut().zip(hi.iter_mut()).zip(w) {
                    *l = f32::from_bits(w << 16);
                    *h = f32::from_bits(w & 0xFFFF_0000);
                }
            }
            done = whole;
        }
        for (k, o) in (c0 + done..).zip(out[done..].iter_mut()) {
            let w = row[(k / 32) * 16 + k % 16];
            *o = f32::from_bits(if k % 32 < 16 { w << 16 } else { w & 0xFFFF_0000 });
        }
    }

    /// Rows `r0..r1` in f32, row-major ((r1 − r0) × cols values) into `out`.
    pub(crate) fn rows_into(&self, r0: usize, r1: usize, out: &mut [f32]) {
        debug_assert!(r0 <= r1 && r1 <= self.rows && out.len() == (r1 - r0) * self.cols);
        if self.cols > 0 {
            for (j, row) in (r0..r1).zip(out.chunks_exact_mut(self.cols)) {
                self.cols_into(j, 0, row);
            }
        }
    }

    /// Columns `c0..c1` of every row in f32, row-major (rows × (c1 − c0) values) into `out`.
    pub(crate) fn cols_block_into(&self, c0: usize, c1: usize, out: &mut [f32]) {
        debug_assert!(c0 <= c1 && c1 <= self.cols && out.len() == self.rows * (c1 - c0));
        if c1 > c0 {
            for (j, row) in out.chunks_exact_mut(c1 - c0).enumerate() {
                self.cols_into(j, c0, row);
            }
        }
    }

    /// The f32 values (exact), row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.rows_into(0, self.rows, &mut out);
        out
    }

    pub(crate) fn words(&self) -> &[u32] {
        &self.words
    }

    /// Words per row.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_every_bf16_value_and_refuses_any_other() {
        // Ragged widths around the 32-value blocks; values with every bf16 bit pattern class (signs, zero,
        // negative zero, subnormal, infinity, large and small exponents).
        let specials = [0.0f32, -0.0, 1.0, -2.5, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(0x0001_0000), 3.0e38, -1.0e-30];
        for cols in [1, 15, 16, 17, 31, 32, 33, 64, 70] {
            let rows = 3;
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let v = specials[i % specials.len()] * if i % 7 == 0 { 1.0 } else { (i as f32 + 0.5) / 3.0 };
                    f32::from_bits(v.to_bits() & 0xFFFF_0000)
                })
                .collect();
            let m = Bf16Matrix::pack(&w, rows, cols).expect("bf16 values pack");
            assert_eq!(m.bytes(), rows * cols.div_ceil(32) * 64);
            let back = m.to_f32();
            assert!(back.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()), "cols {cols}: {back:?} vs {w:?}");
            let mut off = w.clone();
            off[rows * cols - 1] = f32::from_bits(off[rows * cols - 1].to_bits() | 1);
            assert!(Bf16Matrix::pack(&off, rows, cols).is_none(), "cols {cols}: a value with low bits set must stay f32");
            assert!(Bf16Matrix::pack(&w, rows + 1, cols).is_none(), "a shape that does not match the values");
        }
    }
}
