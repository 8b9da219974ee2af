//! [`Tokenizer`]: text ↔ token ids, either the UTF-8 bytes themselves (ids 0–255, models trained by
//! lora-rs) or a Hugging Face `tokenizer.json` read with the `tokenizers` crate.
//!
//! Each token also carries the number of text bytes it covers, so losses can be given in bits per byte
//! (`Σ nats / ln 2 / Σ bytes`), a figure comparable across tokenizers.

use std::path::Path;

use crate::config::LlamaConfig;
use crate::error::{LmError, Result};

/// The byte range (start, end) of text a token covers.
pub type Span = (usize, usize);

/// A tokenizer.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// Token id = byte value.
    Bytes,
    /// A `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// The byte-level tokenizer.
    pub fn bytes() -> Self {
        Tokenizer::Bytes
    }

    /// Reads a `tokenizer.json`; every id it produces must fit the model's vocabulary.
    pub fn from_file(path: &Path, config: &LlamaConfig) -> Result<Self> {
        if !path.exists() {
            return Err(LmError::file(path, "missing: this model is not byte-level (config.json has no \"lora_rs_tokenizer\": \"bytes\"), so it needs its tokenizer.json"));
        }
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| LmError::file(path, format!("not a valid tokenizer.json: {e}")))?;
        let size = t.get_vocab_size(true);
        if size > config.vocab_size {
            return Err(LmError::file(
                path,
                format!("vocabulary of {size} tokens does not fit the model's vocab_size = {}", config.vocab_size),
            ));
        }
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// Token ids of `text` (with the tokenizer's special tokens, e.g. a BOS, where it adds them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_bytes(text)?.0)
    }

    /// Token ids of `text` and, per token, the number of text bytes it newly covers (0 for special tokens), so
    /// the counts add up to the bytes of the text.
    pub fn encode_with_bytes(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        match self {
            Tokenizer::Bytes => Ok((text.bytes().map(u32::from).collect(), vec![1; text.len()])),
            Tokenizer::Hf(t) => {
                let enc = t
                    .encode(text, true)
                    .map_err(|e| LmError::invalid("text", format!("{:.40?}", text), format!("tokenizer failed: {e}")))?;
                // A token covers the text from the end of everything before it to its own end, so overlapping
                // spans (a Metaspace "▁" and the token after it) count once and the bytes add up to the text.
                let mut covered = 0usize;
                let bytes = enc
                    .get_offsets()
                    .iter()
                    .zip(enc.get_special_tokens_mask())
                    .map(|(&(_, end), &special)| {
                        if special == 1 || end <= covered {
                            return 0;
                        }
                        let n = end - covered;
                        covered = end;
                        n as u32
                    })
                    .collect();
                Ok((enc.get_ids().to_vec(), bytes))
            }
        }
    }

    /// Token ids of `text` without the special tokens the tokenizer adds around a text (a BOS), as transformers
    /// tokenises a rendered chat (`add_special_tokens=False`: the template writes them), and each token's byte
    /// span in `text`. Special tokens spelled out in the text (`<|im_end|>`) are matched as such.
    pub fn encode_plain(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        match self {
            Tokenizer::Bytes => Ok((text.bytes().map(u32::from).collect(), (0..text.len()).map(|i| (i, i + 1)).collect())),
            Tokenizer::Hf(t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| LmError::invalid("text", format!("{:.40?}", text), format!("tokenizer failed: {e}")))?;
                Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
            }
        }
    }

    /// The id of the token spelled `token` (a special token such as `<|im_end|>`), if the vocabulary has one;
    /// none for the byte-level tokenizer, which has no special tokens.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => t.token_to_id(token),
        }
    }

    /// The text of `ids` (invalid UTF-8 from a cut byte sequence becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => Ok(String::from_utf8_lossy(&ids.iter().map(|&i| i.min(255) as u8).collect::<Vec<u8>>()).into_owned()),
            Tokenizer::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| LmError::invalid("token ids", format!("{} ids", ids.len()), format!("tokenizer failed: {e}"))),
        }
    }

    /// The text that `new` adds after `prompt`: decoded together (so a word-start marker such as
    /// SentencePiece's "▁" keeps its space) minus the prompt's own text.
    pub fn decode_continuation(&self, prompt: &[u32], new: &[u32]) -> Result<String> {
        if self.is_bytes() {
            return self.decode(new);
        }
        let head = self.decode(prompt)?;
        let all = self.decode(&[prompt, new].concat())?;
        Ok(match all.strip_prefix(&head) {
            Some(rest) => rest.to_string(),
            None => self.decode(new)?,
        })
    }

    /// Whether this is the byte-level tokenizer.
    pub fn is_bytes(&self) -> bool {
        matches!(self, Tokenizer::Bytes)
    }
}

/// Turns a growing list of generated ids into text pieces as soon as they decode to whole characters.
/// Decodes after the prompt's ids, so the first piece keeps a leading space that only context shows.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    prompt: Vec<u32>,
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    /// A decoder with nothing decoded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder of what follows `prompt`.
    pub fn after(prompt: &[u32]) -> Self {
        StreamDecoder { prompt: prompt.to_vec(), ..Self::default() }
    }

    /// Adds one id; returns the new text it completes, if any (held back while it ends in a cut character).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode_continuation(&self.prompt, &self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }

    /// Whatever is left at the end (a cut character shows as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode_continuation(&self.prompt, &self.ids)?;
        let rest = if text.is_char_boundary(self.emitted.min(text.len())) {
            text[self.emitted.min(text.len())..].to_string()
        } else {
            String::new()
        };
        self.emitted = text.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_any_text_and_count_one_byte_per_token() {
        let t = Tokenizer::bytes();
        let s = "SELECT 'é' FROM t; -- ∑";
        let (ids, bytes) = t.encode_with_bytes(s).unwrap();
        assert_eq!(ids.len(), s.len());
        assert!(bytes.iter().all(|&b| b == 1));
        assert_eq!(t.decode(&ids).unwrap(), s);
    }

    #[test]
    fn the_stream_decoder_holds_back_cut_characters() {
        let t = Tokenizer::bytes();
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for &b in "a∑b".as_bytes() {
            if let Some(p) = d.push(&t, b as u32).unwrap() {
                out.push_str(&p);
                assert!(!p.contains('\u{FFFD}'));
            }
        }
        out.push_str(&d.finish(&t).unwrap());
        assert_eq!(out, "a∑b");
    }
}
