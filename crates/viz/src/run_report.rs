//! [`RunReport`]: everything one run has to show, written as a folder of files plus `report.html`.

use std::path::Path;

use crate::write::write_atomic;

use crate::chart::{fmt_loss, BarChart, Chart, ConfusionChart, LossChart, ParamsChart, WrongChart};
use crate::data::{group, slug, Check, Counts, FileInfo, LayerCount, LossSeries, Matrix, Table, Timing};
use crate::dot::{graphviz_available, render_dot, NetGraph};
use crate::error::Result;
use crate::html::{Block, Page, Section};
use crate::metrics::{metrics_csv, metrics_jsonl};

/// The plain data of one run. Fill what applies; empty parts are left out of the files and the page.
///
/// Files written by [`RunReport::write`] (each atomically):
/// `loss.{png,svg}` and `metrics-<series>.{csv,jsonl}` per loss series; `wrong.{png,svg}`;
/// `confusion.{png,svg}`; `params.{png,svg}`; `network.dot` (and `network.svg` when Graphviz is
/// installed); `report.html` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    /// Page title, e.g. `lora demo`.
    pub title: String,
    /// The command line, shown under the title.
    pub command: String,
    /// The run's settings.
    pub settings: Vec<(String, String)>,
    /// Statistics of the data.
    pub data: Vec<(String, String)>,
    /// Tables shown beside the data statistics (e.g. images per class).
    pub data_tables: Vec<Table>,
    /// Training losses, one series per training run (pre-training, fine-tuning…).
    pub losses: Vec<LossSeries>,
    /// Class labels for the wrong-count and confusion charts (default: 0, 1, 2, …).
    pub classes: Vec<String>,
    /// Wrong answers per class, one series per model or adapter.
    pub wrong: Vec<Counts>,
    /// Confusion matrices, one per model shown.
    pub confusion: Vec<Matrix>,
    /// Parameters per layer.
    pub params: Vec<LayerCount>,
    /// Legend name of the LoRA bars in the parameter chart.
    pub params_lora_name: String,
    /// Facts with pass/fail (e.g. the proof that the base is unchanged); shown as the page's banner too.
    pub checks: Vec<Check>,
    /// Grouped bars of real values (e.g. validation loss per corpus and model), written as `scores.{png,svg}`.
    pub scores: Option<(BarChart, String)>,
    /// Further tables, shown side by side in a section of their own.
    pub tables: Vec<Table>,
    /// The network, written as `network.dot`.
    pub graph: Option<NetGraph>,
    /// Files the run wrote (models, JSON); the report's own files are added.
    pub files: Vec<FileInfo>,
    /// Durations.
    pub timings: Vec<Timing>,
    /// The run's JSON report, shown folded at the end.
    pub json: Option<serde_json::Value>,
}

/// Writes `dir/name` atomically and records it.
fn put_file(dir: &Path, written: &mut Vec<FileInfo>, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    write_atomic(&path, bytes)?;
    written.push(FileInfo { path: path.display().to_string(), bytes: bytes.len() as u64 });
    Ok(())
}

fn pairs_table(title: &str, key: &str, pairs: &[(String, String)]) -> Table {
    Table {
        title: title.into(),
        header: vec![key.into(), "value".into()],
        rows: pairs.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect(),
    }
}

impl RunReport {
    /// An empty report with a title.
    pub fn new(title: &str) -> Self {
        RunReport { title: title.to_string(), ..Default::default() }
    }

    /// Adds a setting.
    pub fn setting(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// Adds a data statistic.
    pub fn data_stat(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.data.push((key.to_string(), value.to_string()));
        self
    }

    fn class_labels(&self) -> Vec<String> {
        if !self.classes.is_empty() {
            return self.classes.clone();
        }
        let k = self.wrong.first().map(|c| c.counts.len()).or_else(|| self.confusion.first().map(|m| m.cells.len())).unwrap_or(0);
        (0..k).map(|c| c.to_string()).collect()
    }

    /// The charts this report draws, each with its file stem and caption.
    pub fn charts(&self) -> Vec<(&'static str, Chart, String)> {
        let classes = self.class_labels();
        let mut out = Vec::new();
        if !self.losses.is_empty() {
            let names: Vec<&str> = self.losses.iter().map(|s| s.name.as_str()).collect();
            out.push((
                "loss",
                Chart::Loss(LossChart { title: "Training loss".into(), series: self.losses.clone() }),
                format!("Cross-entropy loss per step (faint) and smoothed (bold): {}.", names.join(", ")),
            ));
        }
        if !self.wrong.is_empty() {
            out.push((
                "wrong",
                Chart::Wrong(WrongChart { title: "Wrong answers per digit".into(), classes: classes.clone(), series: self.wrong.clone() }),
                "Test-set images of each digit that the model got wrong, one bar per model.".to_string(),
            ));
        }
        if let Some((bars, caption)) = &self.scores {
            out.push(("scores", Chart::Bars(bars.clone()), caption.clone()));
        }
        if !self.confusion.is_empty() {
            out.push((
                "confusion",
                Chart::Confusion(ConfusionChart { title: "Confusion matrix".into(), classes, matrices: self.confusion.clone() }),
                "Rows: true digit; columns: predicted digit. Green: correct; red: errors (log scale).".to_string(),
            ));
        }
        if !self.params.is_empty() {
            let lora_name = if self.params_lora_name.is_empty() { "LoRA".to_string() } else { self.params_lora_name.clone() };
            out.push((
                "params",
                Chart::Params(ParamsChart { title: "Parameters per layer".into(), lora_name, layers: self.params.clone() }),
                "Base parameters (weight and bias) against the parameters a LoRA adapter adds, log scale.".to_string(),
            ));
        }
        out
    }

    /// Writes every file into `dir` (created if missing) and returns them with their sizes, `report.html`
    /// last. Nothing is written when a chart's data is invalid.
    pub fn write(&self, dir: &Path) -> Result<Vec<FileInfo>> {
        let charts = self.charts();
        for (_, c, _) in &charts {
            c.validate()?;
        }
        let mut written = Vec::new();
        let mut put = |name: &str, bytes: &[u8]| put_file(dir, &mut written, name, bytes);
        let mut figures = Vec::new();
        for (stem, chart, caption) in &charts {
            let svg = chart.to_svg()?;
            put(&format!("{stem}.png"), &chart.to_png()?)?;
            put(&format!("{stem}.svg"), svg.as_bytes())?;
            figures.push((*stem, caption.clone(), svg));
        }
        let mut metrics = Vec::new();
        for s in &self.losses {
            let stem = format!("metrics-{}", slug(&s.name));
            put(&format!("{stem}.csv"), metrics_csv(s).as_bytes())?;
            put(&format!("{stem}.jsonl"), metrics_jsonl(s).as_bytes())?;
            metrics.push(stem);
        }
        let mut graph_svg = None;
        if let Some(g) = &self.graph {
            let dot = g.to_dot();
            put("network.dot", dot.as_bytes())?;
            if graphviz_available() {
                let svg = render_dot(&dot, "svg")?;
                put("network.svg", &svg)?;
                graph_svg = Some(String::from_utf8_lossy(&svg).into_owned());
            }
        }
        let page = self.page(dir, &figures, &metrics, graph_svg, &written);
        put_file(dir, &mut written, "report.html", page.to_html().as_bytes())?;
        Ok(written)
    }

    fn page(
        &self,
        dir: &Path,
        figures: &[(&str, String, String)],
        metrics: &[String],
        graph_svg: Option<String>,
        written: &[FileInfo],
    ) -> Page {
        let figure = |stem: &str| -> Option<Block> {
            figures.iter().find(|f| f.0 == stem).map(|(stem, caption, svg)| Block::Figure {
                caption: caption.clone(),
                svg: svg.clone(),
                links: vec![format!("{stem}.png"), format!("{stem}.svg")],
            })
        };
        let mut sections = Vec::new();
        let mut left = Vec::new();
        if !self.settings.is_empty() {
            left.push(Block::Table(pairs_table("Settings", "setting", &self.settings)));
        }
        let mut right = Vec::new();
        if !self.data.is_empty() {
            right.push(Block::Table(pairs_table("Data", "statistic", &self.data)));
        }
        right.extend(self.data_tables.iter().cloned().map(Block::Table));
        if !left.is_empty() || !right.is_empty() {
            sections.push(Section { title: "Run".into(), blocks: vec![Block::Columns(vec![left, right])] });
        }
        if !self.checks.is_empty() {
            sections.push(Section { title: "Proof that the base is unchanged".into(), blocks: vec![Block::Checks(self.checks.clone())] });
        }
        if let Some(f) = figure("loss") {
            let mut blocks = vec![f];
            let mut t = Table::new("", &["run", "steps", "first loss", "last loss", "seconds", "metrics"]);
            for (s, stem) in self.losses.iter().zip(metrics) {
                let (first, last) = (s.points.first(), s.points.last());
                t.row(vec![
                    s.name.clone(),
                    s.points.len().to_string(),
                    first.map_or(String::new(), |p| fmt_loss(p.loss)),
                    last.map_or(String::new(), |p| fmt_loss(p.loss)),
                    last.map_or(String::new(), |p| format!("{:.2}", p.seconds)),
                    format!("{stem}.csv, {stem}.jsonl"),
                ]);
            }
            blocks.push(Block::Table(t));
            sections.push(Section { title: "Training loss".into(), blocks });
        }
        if !self.wrong.is_empty() {
            let classes = self.class_labels();
            let mut header = vec!["digit".to_string()];
            header.extend(self.wrong.iter().map(|s| s.name.clone()));
            let mut t = Table { title: "Wrong answers per digit (test set)".into(), header, rows: Vec::new() };
            for (d, label) in classes.iter().enumerate() {
                let mut row = vec![label.clone()];
                row.extend(self.wrong.iter().map(|s| s.counts.get(d).map_or(String::new(), |c| c.to_string())));
                t.rows.push(row);
            }
            let mut total = vec!["total".to_string()];
            total.extend(self.wrong.iter().map(|s| s.counts.iter().sum::<usize>().to_string()));
            t.rows.push(total);
            if self.wrong.iter().any(|s| s.accuracy.is_some()) {
                let mut acc = vec!["accuracy".to_string()];
                acc.extend(self.wrong.iter().map(|s| s.accuracy.map_or(String::new(), |a| a.to_string())));
                t.rows.push(acc);
            }
            let mut blocks: Vec<Block> = figure("wrong").into_iter().collect();
            blocks.push(Block::Table(t));
            blocks.extend(figure("confusion"));
            sections.push(Section { title: "Evaluation".into(), blocks });
        } else if let Some(f) = figure("confusion") {
            sections.push(Section { title: "Evaluation".into(), blocks: vec![f] });
        }
        if let Some(f) = figure("scores") {
            sections.push(Section { title: "Scores".into(), blocks: vec![f] });
        }
        if !self.params.is_empty() || self.graph.is_some() {
            let mut blocks: Vec<Block> = figure("params").into_iter().collect();
            if !self.params.is_empty() {
                let mut t = Table::new("Parameters", &["layer", "base", "LoRA", "LoRA / base"]);
                let mut rows: Vec<(String, usize, usize)> = self.params.iter().map(|l| (l.name.clone(), l.base, l.lora)).collect();
                let (b, l) = rows.iter().fold((0, 0), |(b, l), r| (b + r.1, l + r.2));
                rows.push(("total".into(), b, l));
                for (name, b, l) in rows {
                    let pct = if b > 0 { format!("+{:.3}%", 100.0 * l as f64 / b as f64) } else { String::new() };
                    t.row(vec![name, group(b), group(l), pct]);
                }
                blocks.push(Block::Table(t));
            }
            if let Some(svg) = graph_svg {
                blocks.push(Block::Figure {
                    caption: "The network (Graphviz): frozen base weights dashed grey, trainable tensors orange.".into(),
                    svg,
                    links: vec!["network.dot".into(), "network.svg".into()],
                });
            } else if self.graph.is_some() {
                blocks.push(Block::Text("The network is in network.dot (install Graphviz and run dot -Tsvg to draw it).".into()));
            }
            sections.push(Section { title: "Network and parameters".into(), blocks });
        }
        if !self.tables.is_empty() {
            let cols = self.tables.iter().map(|t| vec![Block::Table(t.clone())]).collect();
            sections.push(Section { title: "Tables".into(), blocks: vec![Block::Columns(cols)] });
        }
        let mut files = Table::new("", &["file", "bytes"]);
        for f in self.files.iter().chain(written) {
            files.row(vec![f.path.clone(), group(f.bytes as usize)]);
        }
        files.row(vec![format!("{} (this page)", dir.join("report.html").display()), String::new()]);
        files.title = "Files".into();
        let mut cols = vec![vec![Block::Table(files)]];
        if !self.timings.is_empty() {
            let mut t = Table::new("Timings", &["what", "seconds"]);
            for x in &self.timings {
                t.row(vec![x.name.clone(), format!("{:.2}", x.seconds)]);
            }
            cols.push(vec![Block::Table(t)]);
        }
        sections.push(Section { title: "Files and timings".into(), blocks: vec![Block::Columns(cols)] });
        if let Some(j) = &self.json {
            sections.push(Section {
                title: "JSON report".into(),
                blocks: vec![Block::Json { summary: "Every number of report.json (click to unfold)".into(), value: j.clone() }],
            });
        }
        Page { title: self.title.clone(), subtitle: self.command.clone(), verdict: self.checks.clone(), sections }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dot::{GraphLayer, GraphLora};

    fn report() -> RunReport {
        let mut r = RunReport::new("lora test");
        r.command = "lora demo --steps 3".into();
        r.setting("rank", 2).data_stat("train images", 600);
        r.losses.push(LossSeries::new("pre-training", &[2.3, 1.5, 0.9], &[0.1, 0.2, 0.3]).unwrap());
        r.losses.push(LossSeries::new("fine-tuning", &[0.5, 0.25], &[0.05, 0.1]).unwrap());
        r.wrong = vec![Counts::new("pre-trained", vec![3, 1, 4], Some(0.875)), Counts::new("LoRA on", vec![0, 9, 2], Some(0.8125))];
        r.confusion = vec![Matrix { name: "pre-trained".into(), cells: vec![vec![7, 2, 1], vec![0, 9, 1], vec![3, 1, 6]] }];
        r.params = vec![LayerCount { name: "linear1".into(), base: 300, lora: 24 }];
        r.checks = vec![Check::new("base bit-for-bit equal", true, "3 tensors")];
        r.graph = Some(NetGraph {
            title: "Net".into(),
            input: "x".into(),
            output: "y".into(),
            layers: vec![GraphLayer { name: "linear1".into(), in_features: 9, out_features: 3, bias: true, activation: None }],
            lora: Some(GraphLora { rank: 2, alpha: 4.0, scale: 2.0 }),
        });
        r.files.push(FileInfo { path: "base.safetensors".into(), bytes: 12345 });
        r.timings.push(Timing { name: "pre-training".into(), seconds: 1.5 });
        r.json = Some(serde_json::json!({"accuracy": 0.875}));
        r
    }

    #[test]
    fn write_puts_every_promised_file_in_the_folder_with_the_page_last() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("report");
        let files = report().write(&dir).unwrap();
        let names: Vec<String> = files.iter().map(|f| Path::new(&f.path).file_name().unwrap().to_string_lossy().into_owned()).collect();
        for want in [
            "loss.png",
            "loss.svg",
            "wrong.png",
            "wrong.svg",
            "confusion.png",
            "confusion.svg",
            "params.png",
            "params.svg",
            "metrics-pre-training.csv",
            "metrics-fine-tuning.jsonl",
            "network.dot",
        ] {
            assert!(names.contains(&want.to_string()), "{want} missing from {names:?}");
        }
        assert_eq!(names.last().unwrap(), "report.html");
        for f in &files {
            assert_eq!(std::fs::metadata(&f.path).unwrap().len(), f.bytes, "{}", f.path);
        }
        let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
        crate::tests_xml(&html);
        assert!(html.contains("0.8125") && html.contains("12,345") && html.contains("base bit-for-bit equal"));
        assert_eq!(std::fs::read_to_string(dir.join("metrics-fine-tuning.csv")).unwrap().lines().count(), 3);
    }

    #[test]
    fn invalid_data_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("report");
        let mut r = report();
        r.wrong[1].counts.pop();
        let e = r.write(&dir).unwrap_err().to_string();
        assert!(e.contains("LoRA on"), "{e}");
        assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none());
    }
}
