//! Text corpora: JSON Lines (optionally gzip-compressed) with a `text` field per row and an optional
//! `split` (`train` or `validation`), or plain text files.
//!
//! Training draws windows of T tokens at random offsets of one token stream (a corpus' train rows joined
//! by newlines); evaluation cuts each validation row (a plain file: the whole file) into consecutive,
//! non-overlapping windows of T tokens, the last one shorter, and predicts every token after the first
//! of each window.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use rand::Rng;
use serde_json::Value;

use crate::error::{LmError, Result};
use crate::tokenizer::Tokenizer;

/// A corpus read from one file.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The file.
    pub path: PathBuf,
    /// Training documents (every row when the file has no `split` field; a plain file is one document).
    pub train: Vec<String>,
    /// Validation documents (every row when the file has no `split` field).
    pub validation: Vec<String>,
}

impl Corpus {
    /// The file's name, used as its key in reports.
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| self.path.display().to_string())
    }
    /// A short name: the file name without `.jsonl`, `.gz`, `.txt` endings (`sql.jsonl.gz` → `sql`).
    pub fn short_name(&self) -> String {
        let mut n = self.name();
        for ext in [".gz", ".jsonl", ".json", ".txt"] {
            if let Some(s) = n.strip_suffix(ext) {
                n = s.to_string();
            }
        }
        n
    }
}

fn is_jsonl(path: &Path) -> bool {
    let n = path.to_string_lossy();
    n.ends_with(".jsonl") || n.ends_with(".jsonl.gz")
}

/// Reads a corpus file; errors name the file, the line and the key.
pub fn read_corpus(path: &Path) -> Result<Corpus> {
    let f = std::fs::File::open(path).map_err(|e| LmError::io(path, e))?;
    let mut reader: Box<dyn Read> =
        if path.to_string_lossy().ends_with(".gz") { Box::new(flate2::read::MultiGzDecoder::new(f)) } else { Box::new(f) };
    if !is_jsonl(path) {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map_err(|e| LmError::io(path, e))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| LmError::file(path, format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to())))?;
        if text.is_empty() {
            return Err(LmError::file(path, "is empty"));
        }
        return Ok(Corpus { path: path.to_path_buf(), train: vec![text.clone()], validation: vec![text] });
    }
    let mut rows = Vec::new();
    let mut any_split = false;
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(|e| LmError::file(path, format!("line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| LmError::file(path, format!("line {}: not valid JSON: {e}", i + 1)))?;
        let text = match v.get("text") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(LmError::file(path, format!("line {}: text = {:.60}: must be a string", i + 1, other.to_string()))),
            None => return Err(LmError::file(path, format!("line {}: missing key text", i + 1))),
        };
        let split = match v.get("split") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "train" || s == "validation" => {
                any_split = true;
                Some(s == "validation")
            }
            Some(other) => {
                return Err(LmError::file(path, format!("line {}: split = {other}: must be \"train\" or \"validation\"", i + 1)))
            }
        };
        rows.push((text, split));
    }
    if rows.is_empty() {
        return Err(LmError::file(path, "holds no rows"));
    }
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (text, split) in rows {
        match split {
            Some(true) => validation.push(text),
            Some(false) => train.push(text),
            None if any_split => train.push(text),
            None => {
                train.push(text.clone());
                validation.push(text);
            }
        }
    }
    Ok(Corpus { path: path.to_path_buf(), train, validation })
}

/// One long token stream to draw training windows from.
#[derive(Debug, Clone)]
pub struct TokenStream {
    ids: Vec<u32>,
}

impl TokenStream {
    /// The train documents of `corpus`, tokenised and joined (byte-level: joined by a newline, as the PyTorch
    /// peer does; other tokenizers: each document encoded on its own, with its special tokens, and appended).
    pub fn from_corpus(corpus: &Corpus, tok: &Tokenizer) -> Result<Self> {
        let ids = if tok.is_bytes() {
            tok.encode(&corpus.train.join("\n"))?
        } else {
            let mut ids = Vec::new();
            for d in &corpus.train {
                ids.extend(tok.encode(d)?);
            }
            ids
        };
        Ok(TokenStream { ids })
    }
    /// Tokens in the stream.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether the stream is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// A window of `len` tokens at a random offset (the whole stream if shorter).
    pub fn window<R: Rng + ?Sized>(&self, rng: &mut R, len: usize) -> &[u32] {
        if self.ids.len() <= len {
            return &self.ids;
        }
        let start = rng.random_range(0..=self.ids.len() - len);
        &self.ids[start..start + len]
    }
}

/// A window of tokens to score and the text bytes each token covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Bytes per token.
    pub bytes: Vec<u32>,
    /// Which tokens are scored (`None`: every token after the first; instruction examples: their completions).
    pub scored: Option<Vec<bool>>,
}

/// The validation windows of `corpus`: each document cut into consecutive windows of `len` tokens (the
/// last one shorter; windows of one token predict nothing and are dropped). `max_tokens` caps the total
/// (the last window kept is cut to fit).
pub fn eval_windows(corpus: &Corpus, tok: &Tokenizer, len: usize, max_tokens: Option<usize>) -> Result<Vec<Window>> {
    if len < 2 {
        return Err(LmError::invalid("context", len, "windows need at least 2 tokens"));
    }
    let mut out = Vec::new();
    let mut total = 0usize;
    for doc in &corpus.validation {
        let (ids, bytes) = tok.encode_with_bytes(doc)?;
        for s in (0..ids.len()).step_by(len) {
            let mut e = (s + len).min(ids.len());
            if let Some(m) = max_tokens {
                e = e.min(s + m.saturating_sub(total));
            }
            if e - s >= 2 {
                out.push(Window { ids: ids[s..e].to_vec(), bytes: bytes[s..e].to_vec(), scored: None });
                total += e - s;
            }
            if max_tokens.is_some_and(|m| total >= m) {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if name.ends_with(".gz") {
            let mut e = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::fast());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap();
        } else {
            std::fs::write(&p, text).unwrap();
        }
        p
    }

    #[test]
    fn jsonl_rows_go_to_their_split_and_gzip_is_read() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "c.jsonl.gz",
            "{\"text\":\"a\",\"split\":\"train\"}\n\n{\"text\":\"b\",\"split\":\"validation\"}\n{\"text\":\"c\"}\n",
        );
        let c = read_corpus(&p).unwrap();
        assert_eq!((c.train, c.validation), (vec!["a".to_string(), "c".into()], vec!["b".to_string()]));
        assert_eq!(c.path.file_name().unwrap(), "c.jsonl.gz");
    }

    #[test]
    fn rows_without_split_serve_both_and_bad_rows_are_named() {
        let d = tempfile::tempdir().unwrap();
        let c = read_corpus(&write(d.path(), "x.jsonl", "{\"text\":\"a\"}\n")).unwrap();
        assert_eq!((c.train.len(), c.validation.len()), (1, 1));
        let e = read_corpus(&write(d.path(), "y.jsonl", "{\"text\":\"a\"}\n{\"body\":\"b\"}\n")).unwrap_err().to_string();
        assert!(e.contains("y.jsonl") && e.contains("line 2: missing key text"), "{e}");
        let e = read_corpus(&write(d.path(), "z.jsonl", "{\"text\":\"a\",\"split\":\"dev\"}\n")).unwrap_err().to_string();
        assert!(e.contains("line 1: split = \"dev\""), "{e}");
        let e = read_corpus(&write(d.path(), "w.jsonl", "{\"text\":3}\n")).unwrap_err().to_string();
        assert!(e.contains("text = 3: must be a string"), "{e}");
    }

    #[test]
    fn plain_text_is_cut_into_consecutive_windows_with_a_shorter_last_one() {
        let d = tempfile::tempdir().unwrap();
        let c = read_corpus(&write(d.path(), "t.txt", "abcdefghij")).unwrap();
        let w = eval_windows(&c, &Tokenizer::bytes(), 4, None).unwrap();
        let lens: Vec<usize> = w.iter().map(|w| w.ids.len()).collect();
        assert_eq!(lens, vec![4, 4, 2]);
        assert_eq!(w[2].ids, vec![b'i' as u32, b'j' as u32]);
        let capped = eval_windows(&c, &Tokenizer::bytes(), 4, Some(6)).unwrap();
        assert_eq!(capped.iter().map(|w| w.ids.len()).collect::<Vec<_>>(), vec![4, 2]);
    }
}
