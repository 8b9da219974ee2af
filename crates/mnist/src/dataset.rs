//! The four MNIST files of a directory as one validated data set, and normalisation.
//!
//! `mean = Σp / (255·N)`, `std = sqrt(Σ(p/255 − mean)² / (N − 1))` over all N training pixels (the unbiased
//! estimate, as `torch.Tensor.std` computes it in the seed).

use std::path::{Path, PathBuf};

use crate::idx::{read_idx, IdxError, IdxKind};

/// One half of the data set: images (count × rows × cols bytes) and their labels.
#[derive(Debug, Clone)]
pub struct Split {
    /// Pixels, `len() * rows * cols` bytes, row-major.
    pub images: Vec<u8>,
    /// One label 0–9 per image.
    pub labels: Vec<u8>,
    /// Rows per image (28 for MNIST).
    pub rows: usize,
    /// Columns per image (28 for MNIST).
    pub cols: usize,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True when the split holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Pixels per image.
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }
    /// A new split holding only the images whose label is `digit`, in their original order.
    pub fn only_digit(&self, digit: u8) -> Split {
        let px = self.pixels();
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for (i, &l) in self.labels.iter().enumerate() {
            if l == digit {
                images.extend_from_slice(&self.images[i * px..(i + 1) * px]);
                labels.push(l);
            }
        }
        Split { images, labels, rows: self.rows, cols: self.cols }
    }

    /// Loads an image file and a label file and checks they agree.
    pub fn load(images: &Path, labels: &Path) -> Result<Split, IdxError> {
        let im = read_idx(images, IdxKind::Images)?;
        let lb = read_idx(labels, IdxKind::Labels)?;
        if im.dims[0] != lb.dims[0] {
            return Err(IdxError::CountMismatch {
                images: images.to_path_buf(),
                n_images: im.dims[0],
                labels: labels.to_path_buf(),
                n_labels: lb.dims[0],
            });
        }
        Ok(Split { images: im.data, labels: lb.data, rows: im.dims[1], cols: im.dims[2] })
    }
}

/// MNIST (or Fashion-MNIST, or any data set in the same four files): train and test splits.
#[derive(Debug, Clone)]
pub struct Mnist {
    /// 60,000 training images for MNIST.
    pub train: Split,
    /// 10,000 test images for MNIST.
    pub test: Split,
}

fn find(dir: &Path, name: &str) -> Result<PathBuf, IdxError> {
    for cand in [dir.join(format!("{name}.gz")), dir.join(name)] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(IdxError::Missing { dir: dir.to_path_buf(), name: name.to_string() })
}

impl Mnist {
    /// Loads `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
    /// `t10k-labels-idx1-ubyte` (each raw or `.gz`) from `dir`, and checks both splits share an image size.
    pub fn load(dir: &Path) -> Result<Mnist, IdxError> {
        let train = Split::load(&find(dir, "train-images-idx3-ubyte")?, &find(dir, "train-labels-idx1-ubyte")?)?;
        let test_images = find(dir, "t10k-images-idx3-ubyte")?;
        let test = Split::load(&test_images, &find(dir, "t10k-labels-idx1-ubyte")?)?;
        if (test.rows, test.cols) != (train.rows, train.cols) {
            return Err(IdxError::BadDims {
                path: test_images,
                dims: vec![test.len() as u32, test.rows as u32, test.cols as u32],
                why: format!("images are {}x{} but training images are {}x{}", test.rows, test.cols, train.rows, train.cols),
            });
        }
        Ok(Mnist { train, test })
    }
}

/// Mean and (unbiased) standard deviation of `pixels / 255`, accumulated in f64.
pub fn mean_std(pixels: &[u8]) -> (f64, f64) {
    let mut hist = [0u64; 256];
    for &p in pixels {
        hist[p as usize] += 1;
    }
    let n = pixels.len() as f64;
    let mean = hist.iter().enumerate().map(|(v, &c)| v as f64 / 255.0 * c as f64).sum::<f64>() / n;
    let ss: f64 = hist.iter().enumerate().map(|(v, &c)| (v as f64 / 255.0 - mean).powi(2) * c as f64).sum();
    (mean, (ss / (n - 1.0).max(1.0)).sqrt())
}

/// `(p / 255 − mean) / std` for each pixel, as f32 (what `ToTensor` + `Normalize` computes).
pub fn normalize(pixels: &[u8], mean: f64, std: f64) -> Vec<f32> {
    let (mean, std) = (mean as f32, std as f32);
    pixels.iter().map(|&p| (p as f32 / 255.0 - mean) / std).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::tests::{gz, idx_bytes};
    use crate::idx::{IMAGES_MAGIC, LABELS_MAGIC};

    fn write_set(dir: &Path, n_train: u32, n_train_labels: u32) {
        let w = |name: &str, b: Vec<u8>| std::fs::write(dir.join(name), b).unwrap();
        w("train-images-idx3-ubyte.gz", gz(&idx_bytes(IMAGES_MAGIC, &[n_train, 2, 2], &vec![9; 4 * n_train as usize])));
        w("train-labels-idx1-ubyte", idx_bytes(LABELS_MAGIC, &[n_train_labels], &vec![3; n_train_labels as usize]));
        w("t10k-images-idx3-ubyte", idx_bytes(IMAGES_MAGIC, &[2, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7]));
        w("t10k-labels-idx1-ubyte.gz", gz(&idx_bytes(LABELS_MAGIC, &[2], &[4, 5])));
    }

    #[test]
    fn loads_a_generated_directory_with_mixed_gzip_and_raw_files() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 3, 3);
        let m = Mnist::load(dir.path()).unwrap();
        assert_eq!((m.train.len(), m.test.len(), m.train.pixels()), (3, 2, 4));
        assert_eq!(m.test.labels, vec![4, 5]);
        assert_eq!(m.test.only_digit(5).images, vec![4, 5, 6, 7]);
    }

    #[test]
    fn image_and_label_count_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 3, 4);
        let e = Mnist::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("3 images") && e.contains("4 labels") && e.contains("train-labels"), "{e}");
    }

    #[test]
    fn missing_file_is_reported_with_directory_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = Mnist::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("missing train-images-idx3-ubyte"), "{e}");
    }

    #[test]
    fn mean_std_matches_a_direct_two_pass_computation() {
        let px: Vec<u8> = (0..1000u32).map(|i| (i * 37 % 256) as u8).collect();
        let f: Vec<f64> = px.iter().map(|&p| p as f64 / 255.0).collect();
        let m = f.iter().sum::<f64>() / f.len() as f64;
        let s = (f.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (f.len() - 1) as f64).sqrt();
        let (mean, std) = mean_std(&px);
        // Both are f64 sums of the same 1000 terms in a different order: agree to ~1e-15 relative.
        assert!((mean - m).abs() < 1e-12 && (std - s).abs() < 1e-12, "{mean} {m} {std} {s}");
        let n = normalize(&[0, 255], mean, std);
        assert!((n[0] - (-(m / s)) as f32).abs() < 1e-5 && (n[1] - ((1.0 - m) / s) as f32).abs() < 1e-5);
    }
}
