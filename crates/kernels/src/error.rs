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
