//! Instruction data: JSON Lines rows in the four formats TRL's `SFTTrainer` takes, turned into token ids and
//! the tokens the loss is taken on, as TRL builds them for the same rows, tokenizer and template.
//!
//! | format | row | ids | trained (loss on [`LossOn::Completions`]) |
//! |---|---|---|---|
//! | text | `{"text"}` | `text + eos`, with the tokenizer's special tokens | every token |
//! | prompt/completion | `{"prompt": str, "completion": str}` | `prompt + completion + eos`, special tokens | the tokens after the common prefix of the tokenised prompt and prompt + completion |
//! | messages | `{"messages": [{role, content}, …]}` | the chat template's text, no special tokens added | the assistant turns (below) |
//! | chat prompt/completion | `{"prompt": [messages], "completion": [messages]}` | the template's text of prompt + completion | after the common prefix with the prompt rendered with the generation prompt |
//!
//! `eos` is the tokenizer's end token (`tokenizer_config.json`'s `eos_token`), appended unless the text already
//! ends with it; byte-level models have none. The assistant turns of a conversation are the bytes the template's
//! `{% generation %}` blocks render (a token counts if it overlaps one, as transformers'
//! `return_assistant_tokens_mask` — TRL's `assistant_only_loss`); a template without such blocks takes each
//! assistant message as the tokens it adds after the conversation before it rendered with the generation prompt
//! (the rule TRL applies to a chat prompt/completion pair, applied to every assistant message). With
//! [`LossOn::All`] every token trains (TRL's defaults for `messages`, and `completion_only_loss=False`).
//!
//! A row is one example (`packing` off: truncated to the sequence length, keeping its start, then padded with
//! targets ignored), or the examples are joined into one stream that windows are drawn from ([`Packing::Wrapped`],
//! TRL's `packing_strategy="wrapped"`: a window may hold parts of two examples, and attention crosses them).
//! Targets outside the trained tokens are [`lora_optim::IGNORE`].

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use rand::Rng;
use serde_json::Value;

use crate::chat::{ChatTemplate, Message};
use crate::error::{LmError, Result};
use crate::tokenizer::Tokenizer;

/// One of TRL's dataset formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"text": str}`.
    Text,
    /// `{"prompt": str, "completion": str}`.
    PromptCompletion,
    /// `{"messages": [{"role", "content"}, …]}`.
    Messages,
    /// `{"prompt": [messages], "completion": [messages]}`.
    ChatPromptCompletion,
}

impl Format {
    /// How errors and summaries name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt/completion",
            Format::Messages => "messages",
            Format::ChatPromptCompletion => "prompt/completion as messages",
        }
    }
    /// Whether rows go through the chat template.
    pub fn is_chat(self) -> bool {
        matches!(self, Format::Messages | Format::ChatPromptCompletion)
    }
}

/// One row.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// Language modelling.
    Text(String),
    /// A prompt and the completion trained on.
    PromptCompletion {
        /// The prompt.
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// A conversation.
    Messages(Vec<Message>),
    /// A conversation and the messages completing it.
    ChatPromptCompletion {
        /// The conversation so far.
        prompt: Vec<Message>,
        /// Its completion (usually one assistant message).
        completion: Vec<Message>,
    },
}

impl Row {
    /// Its format.
    pub fn format(&self) -> Format {
        match self {
            Row::Text(_) => Format::Text,
            Row::PromptCompletion { .. } => Format::PromptCompletion,
            Row::Messages(_) => Format::Messages,
            Row::ChatPromptCompletion { .. } => Format::ChatPromptCompletion,
        }
    }
}

/// Instruction data read from one file.
#[derive(Debug, Clone)]
pub struct Instructions {
    /// The file.
    pub path: PathBuf,
    /// The format of its rows (one per file).
    pub format: Format,
    /// (line, row) of the training rows (every row when no row has a `split`).
    pub train: Vec<(usize, Row)>,
    /// (line, row) of the validation rows (`"split": "validation"`; every row when no row has a `split`).
    pub validation: Vec<(usize, Row)>,
}

impl Instructions {
    /// The file name without `.jsonl` / `.gz` (for reports).
    pub fn short_name(&self) -> String {
        let mut n = self.path.file_name().map_or_else(|| self.path.display().to_string(), |n| n.to_string_lossy().into_owned());
        for ext in [".gz", ".jsonl", ".json"] {
            if let Some(s) = n.strip_suffix(ext) {
                n = s.to_string();
            }
        }
        n
    }
}

/// Where the loss is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossOn {
    /// Completions and assistant turns only (TRL's `completion_only_loss` / `assistant_only_loss`).
    #[default]
    Completions,
    /// Every token.
    All,
}

/// How examples become training rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Packing {
    /// One example per row, truncated to the sequence length (keeping its start), the rest ignored.
    #[default]
    Off,
    /// Examples joined into one stream; rows are windows of it at random offsets.
    Wrapped,
}

fn is_jsonl(path: &Path) -> bool {
    let n = path.to_string_lossy();
    n.ends_with(".jsonl") || n.ends_with(".jsonl.gz")
}

fn lines(path: &Path) -> Result<impl Iterator<Item = (usize, std::io::Result<String>)>> {
    let f = std::fs::File::open(path).map_err(|e| LmError::io(path, e))?;
    let reader: Box<dyn Read> =
        if path.to_string_lossy().ends_with(".gz") { Box::new(flate2::read::MultiGzDecoder::new(f)) } else { Box::new(f) };
    Ok(BufReader::new(reader).lines().enumerate().map(|(i, l)| (i + 1, l)))
}

/// Whether `path` holds instruction rows in a chat or prompt/completion format (its first row has `messages` or
/// `prompt`); a file of `{"text"}` rows is a corpus ([`crate::data::read_corpus`]).
pub fn is_instruction_file(path: &Path) -> Result<bool> {
    if !is_jsonl(path) {
        return Ok(false);
    }
    for (n, line) in lines(path)? {
        let line = line.map_err(|e| LmError::file(path, format!("line {n}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| LmError::file(path, format!("line {n}: not valid JSON: {e}")))?;
        return Ok(v.get("messages").is_some() || v.get("prompt").is_some());
    }
    Ok(false)
}

/// Reads instruction rows (JSON Lines, optionally gzip-compressed); an error names the file, the line and the
/// key. Rows have one format per file; `split` (`train` or `validation`) holds rows out as in corpora.
pub fn read_instructions(path: &Path) -> Result<Instructions> {
    if !is_jsonl(path) {
        return Err(LmError::file(path, "instruction data is JSON Lines: the file name must end in .jsonl or .jsonl.gz"));
    }
    let mut rows: Vec<(usize, Row, Option<bool>)> = Vec::new();
    let mut format: Option<(Format, usize)> = None;
    let mut any_split = false;
    for (n, line) in lines(path)? {
        let at = |why: String| LmError::file(path, format!("line {n}: {why}"));
        let line = line.map_err(|e| at(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        let row = parse_row(&v).map_err(at)?;
        match format {
            None => format = Some((row.format(), n)),
            Some((f, first)) if f != row.format() => {
                return Err(at(format!(
                    "a {} row, but line {first} is a {} row: a file holds one format",
                    row.format().as_str(),
                    f.as_str()
                )))
            }
            Some(_) => {}
        }
        let split = match v.get("split") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "train" || s == "validation" => {
                any_split = true;
                Some(s == "validation")
            }
            Some(other) => return Err(at(format!("split = {other}: must be \"train\" or \"validation\""))),
        };
        rows.push((n, row, split));
    }
    let Some((format, _)) = format else { return Err(LmError::file(path, "holds no rows")) };
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (n, row, split) in rows {
        match split {
            Some(true) => validation.push((n, row)),
            Some(false) => train.push((n, row)),
            None if any_split => train.push((n, row)),
            None => {
                train.push((n, row.clone()));
                validation.push((n, row));
            }
        }
    }
    Ok(Instructions { path: path.to_path_buf(), format, train, validation })
}

fn short(v: &Value) -> String {
    format!("{:.60}", v.to_string())
}

fn parse_row(v: &Value) -> std::result::Result<Row, String> {
    let Some(o) = v.as_object() else { return Err(format!("{}: a row must be a JSON object", short(v))) };
    let has = |k: &str| o.get(k).is_some_and(|x| !x.is_null());
    let keys: Vec<&str> = ["text", "prompt", "messages"].into_iter().filter(|k| has(k)).collect();
    match keys.as_slice() {
        ["text"] => Ok(Row::Text(string(o, "text")?)),
        ["messages"] => Ok(Row::Messages(messages(&o["messages"], "messages", true)?)),
        ["prompt"] => {
            if !has("completion") {
                return Err("missing key completion (a prompt row needs its completion)".into());
            }
            match (&o["prompt"], &o["completion"]) {
                (Value::String(p), Value::String(c)) => Ok(Row::PromptCompletion { prompt: p.clone(), completion: c.clone() }),
                (Value::Array(_), Value::Array(_)) => Ok(Row::ChatPromptCompletion {
                    prompt: messages(&o["prompt"], "prompt", true)?,
                    completion: messages(&o["completion"], "completion", true)?,
                }),
                (p, c) => Err(format!("prompt = {} and completion = {}: both strings, or both lists of messages", short(p), short(c))),
            }
        }
        [] => Err("missing key: a row needs text, prompt and completion, or messages".into()),
        many => Err(format!("keys {} together: a row has one of text, prompt/completion, messages", many.join(", "))),
    }
}

fn string(o: &serde_json::Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match &o[key] {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("{key} = {}: must be a string", short(other))),
    }
}

/// A list of `{role, content}` messages; keys holding null are dropped (as transformers drops them), others refused.
fn messages(v: &Value, key: &str, non_empty: bool) -> std::result::Result<Vec<Message>, String> {
    let Some(items) = v.as_array() else { return Err(format!("{key} = {}: must be a list of messages", short(v))) };
    if non_empty && items.is_empty() {
        return Err(format!("{key} is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let Some(m) = m.as_object() else { return Err(format!("{key}[{i}] = {}: must be {{\"role\", \"content\"}}", short(m))) };
            let field = |k: &str| match m.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                None | Some(Value::Null) => Err(format!("{key}[{i}]: missing key {k}")),
                Some(other) => Err(format!("{key}[{i}].{k} = {}: must be a string", short(other))),
            };
            if let Some((k, _)) = m.iter().find(|(k, x)| *k != "role" && *k != "content" && !x.is_null()) {
                return Err(format!("{key}[{i}].{k}: not supported (a message is its role and content)"));
            }
            Ok(Message { role: field("role")?, content: field("content")? })
        })
        .collect()
}

/// A tokenised row: ids and, per token, whether it is a target (predicted from the tokens before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `trained[i]`: the loss is taken on predicting `ids[i]`.
    pub trained: Vec<bool>,
    /// The row's line in its file.
    pub line: usize,
}

impl Example {
    /// Next-token targets of the first `len` tokens: `targets[i]` = `ids[i + 1]` when that token trains, else
    /// [`lora_optim::IGNORE`] (and for the last position).
    pub fn targets(&self, len: usize) -> Vec<u32> {
        let n = self.ids.len().min(len);
        (0..n).map(|i| if i + 1 < n && self.trained[i + 1] { self.ids[i + 1] } else { lora_optim::IGNORE }).collect()
    }
    /// Tokens trained within the first `len` (the first token is never predicted).
    pub fn trained_within(&self, len: usize) -> usize {
        self.trained.iter().take(len.min(self.ids.len())).skip(1).filter(|&&t| t).count()
    }
}

/// The number of leading ids two sequences share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn with_eos(text: &str, eos: Option<&str>) -> String {
    match eos {
        Some(e) if !text.ends_with(e) => format!("{text}{e}"),
        _ => text.to_string(),
    }
}

/// How rows become examples: the tokenizer, the chat template (with the tokenizer's special tokens) and where the
/// loss is taken.
#[derive(Debug, Clone, Copy)]
pub struct Encoder<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The chat template (its special tokens give the end token appended to text and completions).
    pub chat: &'a ChatTemplate,
    /// Where the loss is taken.
    pub loss: LossOn,
}

impl Encoder<'_> {
    /// Tokenises one row as TRL does (see the module docs); `line` is kept for errors and reports.
    pub fn encode(&self, row: &Row, line: usize) -> Result<Example> {
        encode_row(row, line, self.tokenizer, self.chat, self.loss)
    }
}

fn encode_row(row: &Row, line: usize, tok: &Tokenizer, chat: &ChatTemplate, loss: LossOn) -> Result<Example> {
    let eos = chat.special().eos.as_deref();
    let all = loss == LossOn::All;
    let (ids, trained) = match row {
        Row::Text(text) => {
            let ids = tok.encode(&with_eos(text, eos))?;
            let n = ids.len();
            (ids, vec![true; n])
        }
        Row::PromptCompletion { prompt, completion } => {
            let p = tok.encode(prompt)?;
            let ids = tok.encode(&format!("{prompt}{}", with_eos(completion, eos)))?;
            let start = if all { 0 } else { common_prefix(&p, &ids) };
            let trained = (0..ids.len()).map(|i| i >= start).collect();
            (ids, trained)
        }
        Row::ChatPromptCompletion { prompt, completion } => {
            let p = tok.encode_plain(&chat.render(prompt, true)?)?.0;
            let whole: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
            let (text, spans) = chat.render_marked(&whole, false)?;
            let (ids, offsets) = tok.encode_plain(&text)?;
            let start = if all { 0 } else { common_prefix(&p, &ids) };
            let mut trained: Vec<bool> = (0..ids.len()).map(|i| i >= start).collect();
            if !all && chat.has_generation_marks() {
                for (t, m) in trained.iter_mut().zip(overlapping(&offsets, &spans)) {
                    *t &= m;
                }
            }
            (ids, trained)
        }
        Row::Messages(messages) => {
            let (text, spans) = chat.render_marked(messages, false)?;
            let (ids, offsets) = tok.encode_plain(&text)?;
            let trained = if all {
                vec![true; ids.len()]
            } else if chat.has_generation_marks() {
                overlapping(&offsets, &spans)
            } else {
                assistant_turns(messages, &ids, tok, chat)?
            };
            (ids, trained)
        }
    };
    Ok(Example { ids, trained, line })
}

/// Tokens overlapping any of `spans` (byte ranges, in order), as transformers' `return_assistant_tokens_mask`.
fn overlapping(offsets: &[(usize, usize)], spans: &[std::ops::Range<usize>]) -> Vec<bool> {
    let mut mask = vec![false; offsets.len()];
    let mut s = 0;
    for (i, &(start, end)) in offsets.iter().enumerate() {
        while s < spans.len() && start >= spans[s].end {
            s += 1;
        }
        if s == spans.len() {
            break;
        }
        mask[i] = end > spans[s].start;
    }
    mask
}

/// Each assistant message's tokens: those of the conversation up to and including it that follow the common
/// prefix with the conversation before it rendered with the generation prompt, within the whole conversation's ids.
fn assistant_turns(messages: &[Message], ids: &[u32], tok: &Tokenizer, chat: &ChatTemplate) -> Result<Vec<bool>> {
    let mut trained = vec![false; ids.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.encode_plain(&chat.render(&messages[..i], true)?)?.0;
        let through = tok.encode_plain(&chat.render(&messages[..=i], false)?)?.0;
        let (start, end) = (common_prefix(&before, ids), common_prefix(&through, ids));
        for t in trained.iter_mut().take(end).skip(start) {
            *t = true;
        }
    }
    Ok(trained)
}

/// The examples of one split, and the lines of rows left out because nothing of them trains within the sequence
/// length (a prompt that fills it, a conversation without an assistant message).
#[derive(Debug, Clone)]
pub struct Examples {
    /// The file.
    pub path: PathBuf,
    /// The file's short name.
    pub name: String,
    /// Examples that train at least one token.
    pub examples: Vec<Example>,
    /// Lines of rows left out.
    pub skipped: Vec<usize>,
}

impl Examples {
    /// Tokenises `rows`; rows with no trained token within `len` tokens (within the whole row when `packed`) are
    /// left out and listed; none left is an error. Errors name the file and the line.
    pub fn build(path: &Path, name: &str, rows: &[(usize, Row)], enc: &Encoder<'_>, len: usize, packing: Packing) -> Result<Examples> {
        let mut examples = Vec::with_capacity(rows.len());
        let mut skipped = Vec::new();
        for (line, row) in rows {
            let e = enc.encode(row, *line).map_err(|e| LmError::file(path, format!("line {line}: {e}")))?;
            let within = if packing == Packing::Wrapped { usize::MAX } else { len };
            if e.trained_within(within) == 0 {
                skipped.push(*line);
            } else {
                examples.push(e);
            }
        }
        if examples.is_empty() {
            return Err(LmError::file(
                path,
                format!(
                    "no row trains any token{} (a completion or assistant message is needed, within the first {len} tokens)",
                    if skipped.is_empty() { String::new() } else { format!(" (lines {})", lines_list(&skipped)) }
                ),
            ));
        }
        if !skipped.is_empty() {
            tracing::warn!(file = %path.display(), rows = skipped.len(), lines = %lines_list(&skipped), "rows with nothing to train within the sequence length left out");
        }
        Ok(Examples { path: path.to_path_buf(), name: name.to_string(), examples, skipped })
    }

    /// Tokens in all examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).sum()
    }
    /// Trained tokens in all examples.
    pub fn trained_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.trained.iter().filter(|&&t| t).count()).sum()
    }
}

impl Examples {
    /// Each example as a window to score (cut to `len` tokens, keeping its start), scoring its trained tokens; a
    /// token's bytes are those of its text (special tokens: none).
    pub fn windows(&self, tok: &Tokenizer, len: usize) -> Result<Vec<crate::data::Window>> {
        self.examples
            .iter()
            .filter(|e| e.trained_within(len) > 0)
            .map(|e| {
                let n = e.ids.len().min(len);
                let bytes = e.ids[..n].iter().map(|&id| Ok(tok.decode(&[id])?.len() as u32)).collect::<Result<Vec<u32>>>()?;
                Ok(crate::data::Window { ids: e.ids[..n].to_vec(), bytes, scored: Some(e.trained[..n].to_vec()) })
            })
            .collect()
    }
}

/// The first lines of a list, for messages: `3, 7, 12 and 4 more`.
pub fn lines_list(lines: &[usize]) -> String {
    let shown: Vec<String> = lines.iter().take(5).map(usize::to_string).collect();
    if lines.len() > 5 {
        format!("{} and {} more", shown.join(", "), lines.len() - 5)
    } else {
        shown.join(", ")
    }
}

/// Training rows drawn from examples: one example per row, or windows of the examples joined ([`Packing`]).
#[derive(Debug, Clone)]
pub struct ExampleSource {
    examples: Vec<Example>,
    /// Packed: the joined ids, trained flags, and the count of trained tokens before each position.
    packed: Option<(Vec<u32>, Vec<bool>, Vec<usize>)>,
}

impl ExampleSource {
    /// A source of `examples` (none empty of targets, see [`Examples::build`]).
    pub fn new(examples: &Examples, packing: Packing) -> Self {
        let packed = (packing == Packing::Wrapped).then(|| {
            let ids: Vec<u32> = examples.examples.iter().flat_map(|e| e.ids.iter().copied()).collect();
            let trained: Vec<bool> = examples.examples.iter().flat_map(|e| e.trained.iter().copied()).collect();
            let mut before = Vec::with_capacity(trained.len() + 1);
            before.push(0);
            for &t in &trained {
                before.push(before.last().copied().unwrap_or(0) + t as usize);
            }
            (ids, trained, before)
        });
        ExampleSource { examples: examples.examples.clone(), packed }
    }

    /// Tokens the source holds.
    pub fn len(&self) -> usize {
        match &self.packed {
            Some((ids, _, _)) => ids.len(),
            None => self.examples.iter().map(|e| e.ids.len()).sum(),
        }
    }
    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends one row of `len` ids and its `len` next-token targets, drawn with `rng`: an example (truncated,
    /// then padded with id 0 and ignored targets), or a packed window holding at least one target.
    pub fn draw<R: Rng + ?Sized>(&self, rng: &mut R, len: usize, ids: &mut Vec<u32>, targets: &mut Vec<u32>) {
        match &self.packed {
            None => {
                let e = &self.examples[rng.random_range(0..self.examples.len())];
                let n = e.ids.len().min(len);
                ids.extend_from_slice(&e.ids[..n]);
                ids.extend(std::iter::repeat_n(0, len - n));
                targets.extend(e.targets(len));
                targets.extend(std::iter::repeat_n(lora_optim::IGNORE, len - n));
            }
            Some((all, trained, before)) => {
                let n = all.len();
                let (mut start, mut w) = (0, len.min(n));
                // A window predicts tokens start+1 .. start+w−1; draw until one of them trains (a bounded number
                // of tries, then the first window that does: the stream holds trained tokens).
                for attempt in 0..1000 {
                    start = if n > len { rng.random_range(0..=n - len) } else { 0 };
                    w = len.min(n - start);
                    if before[start + w] - before[start + 1] > 0 {
                        break;
                    }
                    if attempt == 999 {
                        start = (0..n - 1).find(|&s| trained[s + 1]).unwrap_or(0);
                        w = len.min(n - start);
                    }
                }
                ids.extend_from_slice(&all[start..start + w]);
                ids.extend(std::iter::repeat_n(0, len - w));
                for i in 0..len {
                    let j = start + i + 1;
                    targets.push(if i + 1 < w && trained[j] { all[j] } else { lora_optim::IGNORE });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::io::Write;

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
        p
    }

    #[test]
    fn each_of_trls_four_formats_is_read_and_bad_rows_are_named_by_line_and_key() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), "a.jsonl", "{\"prompt\": \"Q\", \"completion\": \"A\", \"id\": 7}\n\n{\"prompt\": \"Q2\", \"completion\": \"B\", \"split\": \"validation\"}\n");
        let r = read_instructions(&p).unwrap();
        assert_eq!(r.format, Format::PromptCompletion);
        assert_eq!((r.train.len(), r.validation.len(), r.validation[0].0), (1, 1, 3));
        let m = file(d.path(), "m.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\", \"name\": null}]}\n");
        assert_eq!(read_instructions(&m).unwrap().train[0].1, Row::Messages(vec![Message::new("user", "hi")]));
        let c = file(
            d.path(),
            "c.jsonl",
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
        );
        assert_eq!(read_instructions(&c).unwrap().format, Format::ChatPromptCompletion);
        let t = file(d.path(), "t.jsonl", "{\"text\": \"x\"}\n");
        assert_eq!(read_instructions(&t).unwrap().format, Format::Text);
        assert!(is_instruction_file(&m).unwrap() && is_instruction_file(&c).unwrap() && !is_instruction_file(&t).unwrap());
        for (body, want) in [
            ("{\"prompt\": \"Q\"}\n", "line 1: missing key completion"),
            (
                "{\"text\": \"a\"}\n{\"prompt\": \"Q\", \"completion\": \"A\"}\n",
                "line 2: a prompt/completion row, but line 1 is a text row",
            ),
            ("{\"messages\": [{\"role\": \"user\"}]}\n", "line 1: messages[0]: missing key content"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": 3}]}\n", "line 1: messages[0].content = 3: must be a string"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"a\", \"tool_calls\": []}]}\n", "messages[0].tool_calls: not supported"),
            ("{\"messages\": []}\n", "line 1: messages is empty"),
            ("{\"prompt\": \"Q\", \"completion\": [1]}\n", "both strings, or both lists of messages"),
            ("{\"text\": \"a\", \"messages\": []}\n", "keys text, messages together"),
            ("{\"body\": 1}\n", "line 1: missing key"),
            ("[1]\n", "a row must be a JSON object"),
            ("{\"text\": \"a\"}\n{oops\n", "line 2: not valid JSON"),
            ("{\"text\": \"a\", \"split\": \"dev\"}\n", "split = \"dev\""),
            ("\n", "holds no rows"),
        ] {
            let p = file(d.path(), "bad.jsonl", body);
            let e = read_instructions(&p).unwrap_err().to_string();
            assert!(e.contains("bad.jsonl") && e.contains(want), "{body:?}: {e}");
        }
        let e = read_instructions(&file(d.path(), "x.txt", "hi")).unwrap_err().to_string();
        assert!(e.contains("must end in .jsonl"), "{e}");
    }

    fn bytes_example(row: Row, loss: LossOn) -> (String, Vec<bool>) {
        let e = encode_row(&row, 1, &Tokenizer::bytes(), &ChatTemplate::chatml(), loss).unwrap();
        (String::from_utf8(e.ids.iter().map(|&i| i as u8).collect()).unwrap(), e.trained)
    }

    /// The trained bytes of a byte-level example, as text.
    fn trained_text(text: &str, trained: &[bool]) -> String {
        text.bytes().zip(trained).filter(|(_, &t)| t).map(|(b, _)| b as char).collect()
    }

    #[test]
    fn byte_level_rows_train_on_completions_and_assistant_turns_of_the_default_template() {
        let (text, trained) =
            bytes_example(Row::PromptCompletion { prompt: "Q: 1+1?\nA:".into(), completion: " 2".into() }, LossOn::Completions);
        assert_eq!((text.as_str(), trained_text(&text, &trained).as_str()), ("Q: 1+1?\nA: 2", " 2"));
        let conv = vec![
            Message::new("user", "hi"),
            Message::new("assistant", "hello"),
            Message::new("user", "bye"),
            Message::new("assistant", "ciao"),
        ];
        let (text, trained) = bytes_example(Row::Messages(conv.clone()), LossOn::Completions);
        assert_eq!(trained_text(&text, &trained), "hello<|im_end|>\nciao<|im_end|>\n");
        let (_, trained) = bytes_example(Row::Messages(conv), LossOn::All);
        assert!(trained.iter().all(|&t| t));
        let (text, trained) = bytes_example(
            Row::ChatPromptCompletion { prompt: vec![Message::new("user", "hi")], completion: vec![Message::new("assistant", "yo")] },
            LossOn::Completions,
        );
        assert_eq!(trained_text(&text, &trained), "yo<|im_end|>\n");
        // Byte-level models have no end token: nothing is appended to text rows.
        let (text, trained) = bytes_example(Row::Text("abc".into()), LossOn::Completions);
        assert_eq!((text.as_str(), trained), ("abc", vec![true; 3]));
    }

    #[test]
    fn targets_are_the_next_trained_token_or_ignore() {
        let e = Example { ids: vec![5, 6, 7, 8], trained: vec![false, false, true, true], line: 1 };
        let i = lora_optim::IGNORE;
        assert_eq!(e.targets(4), vec![i, 7, 8, i]);
        assert_eq!(e.targets(3), vec![i, 7, i]);
        assert_eq!((e.trained_within(4), e.trained_within(2)), (2, 0));
    }

    #[test]
    fn rows_that_train_nothing_within_the_length_are_left_out_and_listed_and_none_left_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let rows = vec![
            (1, Row::PromptCompletion { prompt: "a long prompt".into(), completion: "x".into() }),
            (2, Row::PromptCompletion { prompt: "ab".into(), completion: "cd".into() }),
            (3, Row::Messages(vec![Message::new("user", "no answer")])),
        ];
        let (tok, chat) = (Tokenizer::bytes(), ChatTemplate::chatml());
        let enc = Encoder { tokenizer: &tok, chat: &chat, loss: LossOn::Completions };
        let p = d.path().join("r.jsonl");
        let ex = Examples::build(&p, "r", &rows, &enc, 8, Packing::Off).unwrap();
        assert_eq!((ex.examples.len(), ex.skipped.clone()), (1, vec![1, 3]));
        // Packed, the long prompt's completion trains (the stream is not cut per row).
        let ex = Examples::build(&p, "r", &rows, &enc, 8, Packing::Wrapped).unwrap();
        assert_eq!(ex.skipped, vec![3]);
        let e = Examples::build(&p, "r", &rows[2..], &enc, 8, Packing::Off).unwrap_err().to_string();
        assert!(e.contains("r.jsonl") && e.contains("no row trains any token (lines 3)"), "{e}");
    }

    #[test]
    fn drawn_rows_pad_examples_and_packed_windows_always_hold_a_target() {
        let ex = Examples {
            path: PathBuf::from("x.jsonl"),
            name: "x".into(),
            examples: vec![
                Example { ids: vec![1, 2, 3], trained: vec![false, true, true], line: 1 },
                Example { ids: (10..40).collect(), trained: (0..30).map(|i| i == 29).collect(), line: 2 },
            ],
            skipped: vec![],
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let i = lora_optim::IGNORE;
        let src = ExampleSource::new(&ex, Packing::Off);
        for _ in 0..20 {
            let (mut ids, mut t) = (Vec::new(), Vec::new());
            src.draw(&mut rng, 5, &mut ids, &mut t);
            assert_eq!((ids.len(), t.len()), (5, 5));
            if ids[0] == 1 {
                assert_eq!((ids, t), (vec![1, 2, 3, 0, 0], vec![2, 3, i, i, i]));
            } else {
                // The long example, cut to its first 5 tokens: its one trained token is past them... never drawn,
                // since Examples::build leaves such rows out; here it shows the cut keeps the start.
                assert_eq!(ids, vec![10, 11, 12, 13, 14]);
            }
        }
        let packed = ExampleSource::new(&ex, Packing::Wrapped);
        assert_eq!(packed.len(), 33);
        for _ in 0..200 {
            let (mut ids, mut t) = (Vec::new(), Vec::new());
            packed.draw(&mut rng, 6, &mut ids, &mut t);
            assert_eq!(ids.len(), 6);
            assert!(t.iter().any(|&x| x != i), "a window without a target: {ids:?}");
            // Targets are the next ids where they train: 2, 3 and 39.
            for (k, &x) in t.iter().enumerate() {
                if x != i {
                    assert_eq!(x, ids[k + 1]);
                    assert!([2, 3, 39].contains(&x), "{x}");
                }
            }
        }
    }
}
