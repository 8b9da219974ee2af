//! [`evaluate`]: the validation loss of a base and of each of its adapters on one loaded model, a column
//! each: rows are corpora, columns are `base` (adapters off) then each adapter active alone. Switching
//! columns touches only the active list, never a weight. [`evaluate_on`] also scores instruction examples
//! ([`EvalData::Examples`]: the loss on their completions and assistant turns, each example one window).

use serde_json::{json, Map, Value};

use super::{Event, Progress};
use crate::data::{eval_windows, Corpus};
use crate::error::{LmError, Result};
use crate::eval::{score, Score};
use crate::instruct::Examples;
use crate::{Llama, Tokenizer};

/// How the windows are cut and scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalJob {
    /// Adapters (already loaded on the model) to score, each alone, after the base.
    pub adapters: Vec<String>,
    /// Window length in tokens (at most the model's context).
    pub context: usize,
    /// Tokens scored per corpus at most (`None`: the whole validation split).
    pub max_tokens: Option<usize>,
    /// Windows per forward pass.
    pub batch: usize,
    /// Keep every per-token loss.
    pub per_token: bool,
}

/// Scores of every (corpus, column) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTable {
    /// Row names: each corpus' file name.
    pub corpora: Vec<String>,
    /// Column names: `base`, then each adapter.
    pub columns: Vec<String>,
    /// `scores[row][column]`.
    pub scores: Vec<Vec<Score>>,
    /// `token_losses[row][column][window]`: per-token nats (empty unless the job asked for them).
    pub token_losses: Vec<Vec<Vec<Vec<f64>>>>,
}

/// What one row of the table scores.
#[derive(Debug, Clone, Copy)]
pub enum EvalData<'a> {
    /// A corpus' validation split, cut into windows.
    Corpus(&'a Corpus),
    /// Instruction examples (a validation split, tokenised): their trained tokens.
    Examples(&'a Examples),
}

impl EvalData<'_> {
    fn name(&self) -> String {
        match self {
            EvalData::Corpus(c) => c.name(),
            EvalData::Examples(e) => e.path.file_name().map_or_else(|| e.name.clone(), |n| n.to_string_lossy().into_owned()),
        }
    }
    fn path(&self) -> &std::path::Path {
        match self {
            EvalData::Corpus(c) => &c.path,
            EvalData::Examples(e) => &e.path,
        }
    }
    fn windows(&self, tok: &Tokenizer, job: &EvalJob) -> Result<Vec<crate::data::Window>> {
        match self {
            EvalData::Corpus(c) => eval_windows(c, tok, job.context, job.max_tokens),
            EvalData::Examples(e) => e.windows(tok, job.context),
        }
    }
}

/// Scores `corpora` with the base (adapters off) and with each of `job.adapters` active alone; the model
/// is left with no adapter active.
pub fn evaluate(model: &mut Llama, tok: &Tokenizer, corpora: &[Corpus], job: &EvalJob, progress: Progress<'_>) -> Result<EvalTable> {
    let data: Vec<EvalData<'_>> = corpora.iter().map(EvalData::Corpus).collect();
    evaluate_on(model, tok, &data, job, progress)
}

/// [`evaluate`] over corpora and instruction examples.
pub fn evaluate_on(model: &mut Llama, tok: &Tokenizer, data: &[EvalData<'_>], job: &EvalJob, progress: Progress<'_>) -> Result<EvalTable> {
    let ctx_max = model.config().max_position_embeddings;
    if job.context < 2 || job.context > ctx_max {
        return Err(LmError::invalid("context", job.context, format!("must be between 2 and the model's context ({ctx_max})")));
    }
    if job.batch == 0 {
        return Err(LmError::invalid("batch_size", 0, "must be at least 1"));
    }
    for a in &job.adapters {
        if a == "base" {
            return Err(LmError::invalid("adapter", a, "the name \"base\" is taken by the model without adapters"));
        }
        if !model.lora().adapter_names().iter().any(|n| n == a) {
            return Err(LmError::invalid("adapter", a, "is not loaded on the model"));
        }
    }
    let mut columns = vec!["base".to_string()];
    columns.extend(job.adapters.iter().cloned());
    let mut scores = Vec::new();
    let mut token_losses = Vec::new();
    let result = (|| {
        for c in data {
            let windows = c.windows(tok, job).map_err(|e| LmError::file(c.path(), format!("cutting into windows: {e}")))?;
            let mut row = Vec::new();
            let mut row_tokens = Vec::new();
            for col in &columns {
                let active: Vec<&str> = if col == "base" { vec![] } else { vec![col.as_str()] };
                model.lora_mut().set_active(&active)?;
                let (s, per) = score(model, &windows, job.batch, job.per_token)
                    .map_err(|e| LmError::file(c.path(), format!("scoring with {col}: {e}")))?;
                progress(Event::Scored { corpus: &c.name(), column: col, score: &s });
                row.push(s);
                row_tokens.push(per.unwrap_or_default());
            }
            scores.push(row);
            token_losses.push(row_tokens);
        }
        Ok::<_, LmError>(())
    })();
    model.lora_mut().set_active(&[])?;
    result?;
    Ok(EvalTable { corpora: data.iter().map(EvalData::name).collect(), columns, scores, token_losses })
}

impl EvalTable {
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
}
