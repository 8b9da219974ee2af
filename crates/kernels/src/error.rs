//! The one error of the kernels: operands whose shapes or layouts do not fit.

/// A kernel was handed operands that do not fit: a view outside its slice, shapes that do not multiply,
/// a buffer of the wrong length. The message names the shapes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub String);

/// A kernel's result.
pub type Result<T> = std::result::Result<T, ShapeError>;

/// Returns a [`ShapeError`] with a formatted message.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::ShapeError(format!($($t)*)))
    };
}
pub(crate) use bail;

/// `rows · cols` as a buffer length, or an error naming `what` when the product overflows (a stride-0 view
/// can have any number of rows, so a product of its sizes must never wrap in release arithmetic).
pub(crate) fn elems(what: &str, rows: usize, cols: usize) -> Result<usize> {
    match rows.checked_mul(cols) {
        Some(n) => Ok(n),
        None => bail!("{what}: {rows}x{cols} values overflow the address space"),
    }
}
