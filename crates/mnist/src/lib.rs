//! MNIST-format (IDX) data: a validating reader and the normalisation the seed uses.
//!
//! An IDX file is a big-endian header — magic `0x0000_08_NN` where `NN` is the number of dimensions
//! (`0x0803` = 2051 for images, `0x0801` = 2049 for labels), then one `u32` per dimension — followed by
//! `prod(dims)` unsigned bytes. Files may be gzip-compressed (detected from the `1f 8b` signature, not the
//! name). Normalisation maps a pixel `p ∈ [0, 255]` to `(p / 255 − mean) / std`, with `mean` and `std`
//! computed over every pixel of the training images (MNIST: 0.1307 and 0.3081).
#![deny(missing_docs)]

mod dataset;
mod idx;

pub use dataset::{mean_std, normalize, Mnist, Split};
pub use idx::{decode_idx, parse_idx, read_idx, IdxData, IdxError, IdxKind, IMAGES_MAGIC, LABELS_MAGIC};
