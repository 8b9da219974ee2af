//! `--report DIR` for the LM commands: training-loss curves, the evaluation tables, the JSON summary.

use std::path::Path;

use anyhow::Result;
use lora_lm::train::Trainer;
use lora_viz::{BarChart, LossSeries, RunReport, Table as VizTable, Timing};
use serde_json::Value;

use crate::report_dir::{command_line, json_table, write};
use lora_lm::jobs::EvalTable as Table;

/// A training run's losses as a series, with the seconds elapsed at each step.
fn series(name: &str, t: &Trainer) -> Result<LossSeries> {
    let losses: Vec<f32> = t.losses.iter().map(|l| l.1 as f32).collect();
    let secs: Vec<f64> = t.losses.iter().map(|l| l.2).collect();
    Ok(LossSeries::new(name, &losses, &secs)?)
}

/// Bits per byte and nats per token of an evaluation table.
fn tables(t: &Table) -> Vec<VizTable> {
    let mut header = vec!["corpus"];
    header.extend(t.columns.iter().map(String::as_str));
    let mut bpb = VizTable::new("Validation bits per byte (lower is better)", &header);
    let mut nats = VizTable::new("Validation loss, nats per token", &header);
    for (c, row) in t.corpora.iter().zip(&t.scores) {
        let mut r1 = vec![c.clone()];
        let mut r2 = vec![c.clone()];
        for s in row {
            r1.push(format!("{:.4}", s.bits_per_byte));
            r2.push(format!("{:.4}", s.loss));
        }
        bpb.row(r1);
        nats.row(r2);
    }
    vec![bpb, nats]
}

/// Writes a report of training runs and evaluation tables.
pub fn training(dir: &Path, title: &str, runs: &[(&str, &Trainer)], evals: &[&Table], summary: &Value) -> Result<()> {
    let mut r = RunReport::new(title);
    r.command = command_line();
    for (name, t) in runs {
        r.losses.push(series(name, t)?);
        r.timings.push(Timing { name: name.to_string(), seconds: t.seconds() });
        let s = t.settings();
        r.setting(&format!("{name}: steps × batch × length"), format!("{} × {} × {}", s.steps, s.batch_size, s.seq_len))
            .setting(&format!("{name}: learning rate (peak, AdamW)"), s.lr)
            .setting(&format!("{name}: seed"), s.seed);
    }
    for t in evals {
        r.tables.extend(tables(t));
    }
    if let Some(t) = evals.first() {
        let series =
            t.columns.iter().enumerate().map(|(j, col)| (col.clone(), t.scores.iter().map(|row| row[j].bits_per_byte).collect())).collect();
        let bars = BarChart {
            title: "Validation bits per byte".into(),
            y_desc: "bits per byte (lower is better)".into(),
            x_desc: "validation data".into(),
            groups: t.corpora.clone(),
            series,
            decimals: 3,
        };
        r.scores = Some((
            bars,
            "Validation bits per byte of each corpus, one bar per model: the base alone and each adapter on the same loaded base.".into(),
        ));
    }
    r.tables.push(json_table("Summary (JSON)", summary));
    r.json = Some(summary.clone());
    write(dir, &r)
}
