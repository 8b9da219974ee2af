//! Pictures and reports for lora-rs runs: charts as PNG and SVG, the network as Graphviz DOT, metrics as
//! CSV and JSON lines, and one self-contained HTML page that holds them all.
//!
//! The crate takes plain data — named loss series, named wrong-count series, confusion matrices, per-layer
//! parameter counts, key/value settings, checks, tables, file sizes, timings — and writes files. It knows
//! nothing of the command line, of MNIST or of candle, so a new command wires a report in a few lines:
//!
//! ```no_run
//! use lora_viz::{Counts, LossSeries, RunReport};
//!
//! let mut r = RunReport::new("lora finetune");
//! r.setting("rank", 4);
//! r.losses.push(LossSeries::new("fine-tuning", &[2.3, 1.1, 0.4], &[0.1, 0.2, 0.3]).unwrap());
//! r.wrong.push(Counts::new("pre-trained", vec![17, 9, 30], Some(0.97)));
//! r.wrong.push(Counts::new("adapter a", vec![3, 40, 28], Some(0.91)));
//! let written = r.write(std::path::Path::new("runs/x/report")).unwrap();
//! ```
//!
//! Charts are drawn with `plotters`; text in PNGs is rendered with the bundled DejaVu Sans (see
//! `fonts/LICENSE`), so no system fonts are needed. Every file is written atomically (a temporary file in the same directory, renamed into place).
#![deny(missing_docs)]

mod chart;
mod data;
mod dot;
mod error;
mod html;
mod metrics;
mod run_report;
mod write;

pub use chart::{smooth, BarChart, Chart, ConfusionChart, LossChart, ParamsChart, WrongChart};
pub use data::{group, slug, Check, Counts, FileInfo, LayerCount, LossPoint, LossSeries, Matrix, Table, Timing};
pub use dot::{graphviz_available, render_dot, GraphLayer, GraphLora, NetGraph};
pub use error::{Result, VizError};
pub use html::{Block, Page, Section};
pub use metrics::{metrics_csv, metrics_jsonl};
pub use run_report::RunReport;

/// Parses an HTML page written by [`Page::to_html`] as XML (its DOCTYPE allowed).
#[cfg(test)]
pub(crate) fn tests_xml(s: &str) -> roxmltree::Document<'_> {
    let opt = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    roxmltree::Document::parse_with_options(s, opt).unwrap()
}
