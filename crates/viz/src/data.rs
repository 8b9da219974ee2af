//! The plain data a report is made of: named series, matrices, counts, checks, tables.

use crate::error::{Result, VizError};

/// One training step: its 1-based number, its loss and the seconds since training started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossPoint {
    /// 1-based step.
    pub step: usize,
    /// The step's loss.
    pub loss: f32,
    /// Seconds since training started, at the end of this step.
    pub seconds: f64,
}

/// A named training run's losses, one point per step.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSeries {
    /// Shown as the panel's title and used (as a slug) in file names, e.g. `pre-training`.
    pub name: String,
    /// The steps in order.
    pub points: Vec<LossPoint>,
}

impl LossSeries {
    /// A series from per-step losses and per-step elapsed seconds (equal lengths; step numbers start at 1).
    pub fn new(name: &str, losses: &[f32], seconds: &[f64]) -> Result<Self> {
        if losses.len() != seconds.len() {
            return Err(VizError::invalid(
                format!("loss series \"{name}\""),
                format!("{} losses but {} timestamps", losses.len(), seconds.len()),
            ));
        }
        let points = losses.iter().zip(seconds).enumerate().map(|(i, (&loss, &seconds))| LossPoint { step: i + 1, loss, seconds });
        Ok(LossSeries { name: name.to_string(), points: points.collect() })
    }
}

/// A named series of counts per class (e.g. wrong answers per digit), with the model's accuracy if known.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    /// The model, e.g. `LoRA on` or an adapter's name.
    pub name: String,
    /// One count per class.
    pub counts: Vec<usize>,
    /// Accuracy over the whole test set, shown in the legend.
    pub accuracy: Option<f64>,
}

impl Counts {
    /// A named count series.
    pub fn new(name: &str, counts: Vec<usize>, accuracy: Option<f64>) -> Self {
        Counts { name: name.to_string(), counts, accuracy }
    }
}

/// A named confusion matrix: `cells[true][predicted]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// The model it belongs to.
    pub name: String,
    /// Square: one row per true class, one column per predicted class.
    pub cells: Vec<Vec<usize>>,
}

/// Parameters of one layer: the base's (weight + bias) and the ones a LoRA adapter adds.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCount {
    /// Layer name, e.g. `linear1`.
    pub name: String,
    /// Base parameters (weight and bias).
    pub base: usize,
    /// Parameters of the adapter's A and B.
    pub lora: usize,
}

/// A yes/no fact with its evidence, e.g. "base weights bit-for-bit equal: true".
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// Numbers behind it (may be empty).
    pub detail: String,
}

impl Check {
    /// A check.
    pub fn new(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Check { name: name.to_string(), ok, detail: detail.into() }
    }
}

/// A titled table of text cells.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// Caption.
    pub title: String,
    /// Column headings.
    pub header: Vec<String>,
    /// Rows (each as long as `header`).
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these headings.
    pub fn new(title: &str, header: &[&str]) -> Self {
        Table { title: title.to_string(), header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }
    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) -> &mut Self {
        self.rows.push(cells);
        self
    }
}

/// A file and its size in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct FileInfo {
    /// Path as shown to the user.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// A named duration.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// What took this long, e.g. `pre-training`.
    pub name: String,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// 2807010 → "2,807,010".
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A file-name-safe form of a name: lower-case ASCII letters and digits, other runs become one `-`
/// ("LoRA on" → "lora-on"); never empty.
pub fn slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
    }
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() {
        s.push('x');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_puts_commas_between_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(6794), "6,794");
        assert_eq!(group(2807010), "2,807,010");
    }

    #[test]
    fn slug_keeps_letters_and_digits_and_is_never_empty() {
        assert_eq!(slug("LoRA on"), "lora-on");
        assert_eq!(slug("  pre-training (1 epoch) "), "pre-training-1-epoch");
        assert_eq!(slug("äöü"), "x");
    }

    #[test]
    fn loss_series_numbers_steps_from_one_and_refuses_mismatched_lengths() {
        let s = LossSeries::new("a", &[2.0, 1.0], &[0.5, 1.0]).unwrap();
        assert_eq!(s.points[1], LossPoint { step: 2, loss: 1.0, seconds: 1.0 });
        let e = LossSeries::new("fine-tuning", &[2.0], &[]).unwrap_err().to_string();
        assert!(e.contains("fine-tuning") && e.contains("1 losses but 0 timestamps"), "{e}");
    }
}
