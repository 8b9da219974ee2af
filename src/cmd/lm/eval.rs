//! `lora lm eval`: validation loss of a base and its adapters on one loaded model, a column each.

use std::time::Instant;

use anyhow::{Context, Result};
use lora_lm::data::{eval_windows, Corpus};
use lora_lm::eval::{score, Score};
use lora_lm::hf::{load_adapter, load_model, load_tokenizer};
use lora_lm::{Llama, Tokenizer};
use serde_json::{json, Map, Value};

use super::corpus;
use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::LmEvalArgs;

/// Scores of every (corpus, model) pair: rows = corpora, columns = "base" then each adapter.
pub struct Table {
    pub corpora: Vec<String>,
    pub columns: Vec<String>,
    pub scores: Vec<Vec<Score>>,
    pub token_losses: Vec<Vec<Vec<Vec<f64>>>>,
}

/// How the windows are cut and scored.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Window length in tokens.
    pub ctx: usize,
    /// Tokens scored per file at most.
    pub max_tokens: Option<usize>,
    /// Windows per forward pass.
    pub batch: usize,
    /// Keep every per-token loss.
    pub per_token: bool,
}

/// Scores `corpora` with the base (adapters off) and with each adapter in `adapters` active alone.
pub fn eval_table(model: &mut Llama, tok: &Tokenizer, corpora: &[Corpus], adapters: &[String], w: Windows) -> Result<Table> {
    let Windows { ctx, max_tokens, batch, per_token } = w;
    let mut columns = vec!["base".to_string()];
    columns.extend(adapters.iter().cloned());
    let mut scores = Vec::new();
    let mut token_losses = Vec::new();
    for c in corpora {
        let windows = eval_windows(c, tok, ctx, max_tokens).with_context(|| format!("cutting {} into windows", c.path.display()))?;
        let mut row = Vec::new();
        let mut row_tokens = Vec::new();
        for col in &columns {
            let active: Vec<&str> = if col == "base" { vec![] } else { vec![col.as_str()] };
            model.lora_mut().set_active(&active)?;
            let (s, per) = score(model, &windows, batch, per_token).with_context(|| format!("scoring {} with {col}", c.path.display()))?;
            row.push(s);
            row_tokens.push(per.unwrap_or_default());
        }
        scores.push(row);
        token_losses.push(row_tokens);
    }
    model.lora_mut().set_active(&[])?;
    Ok(Table { corpora: corpora.iter().map(Corpus::name).collect(), columns, scores, token_losses })
}

impl Table {
    /// `{"<file>": {"<column>": {"loss", "bits_per_byte", "tokens"}}}`.
    pub fn json(&self) -> Value {
        let mut out = Map::new();
        for (c, row) in self.corpora.iter().zip(&self.scores) {
            let mut m = Map::new();
            for (col, s) in self.columns.iter().zip(row) {
                m.insert(col.clone(), json!({"loss": s.loss, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens}));
            }
            out.insert(c.clone(), Value::Object(m));
        }
        Value::Object(out)
    }

    /// `{"<file>": {"<column>": [[per-token nats of window 0], …]}}`.
    pub fn token_losses_json(&self) -> Value {
        let mut out = Map::new();
        for (c, row) in self.corpora.iter().zip(&self.token_losses) {
            let m: Map<String, Value> = self.columns.iter().zip(row).map(|(col, w)| (col.clone(), json!(w))).collect();
            out.insert(c.clone(), Value::Object(m));
        }
        Value::Object(out)
    }

    /// Prints bits per byte, rows = corpora, columns = models; the best of each row marked with *.
    pub fn print(&self) {
        let w = self.corpora.iter().map(String::len).max().unwrap_or(4).max(6);
        print!("{:<w$}", "bits/byte");
        for c in &self.columns {
            print!(" {c:>10}");
        }
        println!();
        for (c, row) in self.corpora.iter().zip(&self.scores) {
            print!("{c:<w$}");
            let best = row.iter().map(|s| s.bits_per_byte).fold(f64::INFINITY, f64::min);
            for s in row {
                let mark = if s.bits_per_byte == best { "*" } else { " " };
                print!(" {:>9.4}{mark}", s.bits_per_byte);
            }
            println!();
        }
        if let Some(row) = self.scores.first() {
            println!("({} tokens scored per model on {}; * = lowest in the row)", row[0].tokens, self.corpora[0]);
        }
    }
}

pub fn run(a: LmEvalArgs) -> Result<()> {
    check_outputs(&[
        ("--json", a.json.as_deref(), Out::File),
        ("--token-losses", a.token_losses.as_deref(), Out::File),
        ("--report", a.report.report.as_deref(), Out::Dir),
    ])?;
    let t0 = Instant::now();
    let (mut model, _) = load_model(&a.model).with_context(|| format!("loading the model {}", a.model.display()))?;
    let tok = load_tokenizer(&a.model, model.config())?;
    let mut names = Vec::new();
    for (name, dir) in &a.adapter {
        if name == "base" {
            anyhow::bail!("--adapter {name}={}: the name \"base\" is taken by the model without adapters", dir.display());
        }
        load_adapter(&mut model, name, dir, a.force).with_context(|| format!("loading adapter {name} from {}", dir.display()))?;
        names.push(name.clone());
    }
    let corpora: Vec<Corpus> = a.data.iter().map(|p| corpus(p)).collect::<Result<_>>()?;
    let ctx = a.context.map_or(model.config().max_position_embeddings, |c| c as usize);
    if ctx > model.config().max_position_embeddings {
        anyhow::bail!("--context {ctx} is longer than the model's context ({})", model.config().max_position_embeddings);
    }
    let w =
        Windows { ctx, max_tokens: a.max_tokens.map(|m| m as usize), batch: a.batch_size as usize, per_token: a.token_losses.is_some() };
    let table = eval_table(&mut model, &tok, &corpora, &names, w)?;
    table.print();
    let seconds = t0.elapsed().as_secs_f64();
    println!("({seconds:.1} s)");
    if let Some(p) = &a.json {
        write_json(p, &table.json())?;
    }
    if let Some(p) = &a.token_losses {
        write_json(p, &table.token_losses_json())?;
    }
    if let Some(dir) = &a.report.report {
        super::report_dir::training(dir, "lora lm eval", &[], &[&table], &table.json())?;
    }
    Ok(())
}
