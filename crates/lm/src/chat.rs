//! Chat templates: a conversation (a list of `{role, content}` messages) rendered to the text a model was
//! trained on, as transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` renders it.
//!
//! A template is the Jinja source in `tokenizer_config.json`'s `chat_template` (or `chat_template.jinja`).
//! It runs in [`minijinja`] set up as transformers sets up Jinja2: `trim_blocks` and `lstrip_blocks`, loop
//! controls (`break`, `continue`), lenient undefined values (printed as nothing), Python's string and dict
//! methods (`.strip()`, `.items()`, … from `minijinja-contrib`'s pycompat), and transformers' extras:
//!
//! - `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` —
//!   `", "` and `": "` between items, non-ASCII kept, floats as Python prints them (not Jinja's HTML-safe form);
//! - `raise_exception(message)`: the rendering fails with that message;
//! - `strftime_now(format)`: the current time (UTC) through `%d %b %Y`-style directives;
//! - `{% generation %}…{% endgeneration %}`: marks assistant output; [`ChatTemplate::render_marked`] returns the
//!   byte ranges it covered (transformers' `return_assistant_tokens_mask` reads the same blocks).
//!
//! The variables a template sees are transformers' own: `messages`, `add_generation_prompt`, `tools` and
//! `documents` (both none), and the tokenizer's special tokens that are set (`bos_token`, `eos_token`,
//! `unk_token`, `pad_token`).
//!
//! Models without a template: byte-level models (lora-rs' own) get [`ChatTemplate::chatml`], ChatML with its
//! markers as plain text (`<|im_start|>user\n…<|im_end|>\n`), whose end marker `<|im_end|>` is where a reply
//! stops; other models have to be given one (docs/chat.md).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

use crate::error::{LmError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, … (the template decides which it takes).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// The tokenizer's special tokens as `tokenizer_config.json` names them (those that are set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos: Option<String>,
    /// `eos_token`.
    pub eos: Option<String>,
    /// `unk_token`.
    pub unk: Option<String>,
    /// `pad_token`.
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// The four tokens of a `tokenizer_config.json` object: each a string, `{"content": string, …}` (an
    /// `AddedToken`) or null; `what` names the file in errors.
    pub fn from_config(config: &serde_json::Value, what: &str) -> Result<Self> {
        let get = |key: &str| -> Result<Option<String>> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(v @ serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(LmError::invalid(format!("{what}: {key}"), v, "must be a string or {\"content\": string}")),
                },
                Some(v) => Err(LmError::invalid(format!("{what}: {key}"), v, "must be a string or {\"content\": string}")),
            }
        };
        Ok(SpecialTokens { bos: get("bos_token")?, eos: get("eos_token")?, unk: get("unk_token")?, pad: get("pad_token")? })
    }
}

/// Where a template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// The model's own (`tokenizer_config.json` or `chat_template.jinja`), or a file given for it.
    Given(String),
    /// lora-rs' default for byte-level models: [`ChatTemplate::chatml`].
    Default,
}

/// A compiled chat template with the special tokens it renders with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
    special: SpecialTokens,
    origin: TemplateSource,
    marked: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("special", &self.special).finish_non_exhaustive()
    }
}

/// The name the template is compiled under (no extension: no auto-escaping).
const NAME: &str = "chat_template";
/// What a `{% generation %}` block's output is wrapped in while rendering (private-use characters; input
/// holding them is refused).
const MARK_START: char = '\u{F8F0}';
const MARK_END: char = '\u{F8F1}';
const MARK_FILTER: &str = "lora_rs_generation";

/// ChatML (as transformers' documentation writes it, and as Qwen and many fine-tunes use it), lora-rs'
/// default template for byte-level models.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// ChatML's end-of-turn marker: where a reply rendered by [`CHATML`] ends.
pub const CHATML_END: &str = "<|im_end|>";

impl ChatTemplate {
    /// Compiles `source` (Jinja) with the tokenizer's special tokens; an error names the line at fault.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self> {
        Self::build(source, special, TemplateSource::Given(String::new()))
    }

    /// [`ChatTemplate::new`], recording where the template came from (shown in errors and `/v1/models`).
    pub fn from_source(source: &str, special: SpecialTokens, origin: &str) -> Result<Self> {
        Self::build(source, special, TemplateSource::Given(origin.to_string()))
    }

    /// lora-rs' default for models without a template: [`CHATML`], no special tokens.
    pub fn chatml() -> Self {
        Self::build(CHATML, SpecialTokens::default(), TemplateSource::Default).expect("the built-in ChatML template compiles")
    }

    fn build(source: &str, special: SpecialTokens, origin: TemplateSource) -> Result<Self> {
        let (rewritten, marked) = rewrite_generation_blocks(source);
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| template_error(&origin, "does not compile", &e))?);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter(MARK_FILTER, |s: String| format!("{MARK_START}{s}{MARK_END}"));
        env.add_function("raise_exception", |message: String| -> std::result::Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime(&format, now_utc()));
        env.add_template_owned(NAME, rewritten).map_err(|e| template_error(&origin, "does not compile", &e))?;
        Ok(ChatTemplate { env: Arc::new(env), source: source.into(), special, origin, marked })
    }

    /// The Jinja source as given.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The special tokens it renders with.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }
    /// Where it came from.
    pub fn origin(&self) -> &TemplateSource {
        &self.origin
    }
    /// Whether it is lora-rs' default ([`ChatTemplate::chatml`]).
    pub fn is_default(&self) -> bool {
        self.origin == TemplateSource::Default
    }
    /// Whether it marks assistant output with `{% generation %}` blocks.
    pub fn has_generation_marks(&self) -> bool {
        self.marked
    }

    /// The text that ends a reply as plain text: ChatML's `<|im_end|>` for the default, else the end-of-sequence
    /// token's text (a stop string for tokenizers that spell it out, such as the byte-level one).
    pub fn end_text(&self) -> Option<&str> {
        if self.is_default() {
            Some(CHATML_END)
        } else {
            self.special.eos.as_deref()
        }
    }

    /// The text of `messages`, followed by the assistant's header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        Ok(self.render_marked_with(messages, add_generation_prompt, &BTreeMap::new())?.0)
    }

    /// [`ChatTemplate::render`] with more template variables (e.g. Llama 3.1's `date_string`).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &BTreeMap<String, serde_json::Value>,
    ) -> Result<String> {
        Ok(self.render_marked_with(messages, add_generation_prompt, extra)?.0)
    }

    /// The text and the byte ranges of it that `{% generation %}` blocks produced (empty without such blocks).
    pub fn render_marked(&self, messages: &[Message], add_generation_prompt: bool) -> Result<(String, Vec<Range<usize>>)> {
        self.render_marked_with(messages, add_generation_prompt, &BTreeMap::new())
    }

    fn render_marked_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &BTreeMap<String, serde_json::Value>,
    ) -> Result<(String, Vec<Range<usize>>)> {
        for (i, m) in messages.iter().enumerate() {
            for (key, text) in [("role", &m.role), ("content", &m.content)] {
                if text.contains([MARK_START, MARK_END]) {
                    return Err(LmError::invalid(
                        format!("messages[{i}].{key}"),
                        format!("{:.40?}", text),
                        "holds U+F8F0 or U+F8F1, characters lora-rs reserves for marking assistant output",
                    ));
                }
            }
        }
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from(Serde(messages)));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        let s = &self.special;
        for (key, tok) in [("bos_token", &s.bos), ("eos_token", &s.eos), ("unk_token", &s.unk), ("pad_token", &s.pad)] {
            if let Some(t) = tok {
                ctx.insert(key.into(), Value::from(t.as_str()));
            }
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), Value::from(Serde(v)));
        }
        let template = self.env.get_template(NAME).map_err(|e| template_error(&self.origin, "does not compile", &e))?;
        let raw = template.render(Value::from(ctx)).map_err(|e| template_error(&self.origin, "refused the conversation", &e))?;
        Ok(unmark(&raw))
    }
}

fn template_error(origin: &TemplateSource, what: &str, e: &JinjaError) -> LmError {
    let name = match origin {
        TemplateSource::Given(s) if !s.is_empty() => format!("chat template ({s})"),
        TemplateSource::Given(_) => "chat template".to_string(),
        TemplateSource::Default => "chat template (lora-rs' default ChatML)".to_string(),
    };
    let mut why = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        why = format!("{why} (template line {line})");
    }
    LmError::invalid(name, what, why)
}

/// Strips the generation marks out of a rendering: the text and the byte ranges they enclosed.
fn unmark(raw: &str) -> (String, Vec<Range<usize>>) {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut open = Vec::new();
    for c in raw.chars() {
        match c {
            MARK_START => open.push(text.len()),
            MARK_END => {
                if let Some(start) = open.pop() {
                    if open.is_empty() {
                        spans.push(start..text.len());
                    }
                }
            }
            c => text.push(c),
        }
    }
    (text, spans)
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (with any whitespace control) into a filter block of the
/// same whitespace control, so that trimming works as in Jinja2 and the block's output is wrapped in marks.
/// Returns the source and whether any block was found.
fn rewrite_generation_blocks(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return (out, found);
        };
        let inner = &tag[2..end];
        let (lead, body) = inner.strip_prefix(['-', '+']).map_or(("", inner), |b| (&inner[..1], b));
        let (body, trail) = body.strip_suffix(['-', '+']).map_or((body, ""), |b| (b, &body[b.len()..]));
        match body.trim() {
            "generation" => {
                out.push_str(&format!("{{%{lead} filter {MARK_FILTER} {trail}%}}"));
                found = true;
            }
            "endgeneration" => out.push_str(&format!("{{%{lead} endfilter {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, each option settable by keyword (`indent` may also come first, as Jinja's own filter).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<Value> = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(i64::try_from(v.clone()).unwrap_or(0).max(0) as usize)),
            ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
            _ => return Err(JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: indent = {v}: must be a number or a string"))),
        },
    };
    let ensure_ascii: bool = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get::<Option<Vec<String>>>("separators")?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => {
            return Err(JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: separators = {other:?}: must be two strings")))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let opts = JsonOptions { indent, item, key, ensure_ascii, sort_keys };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

struct JsonOptions {
    indent: Option<String>,
    item: String,
    key: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(out: &mut String, v: &Value, o: &JsonOptions, depth: usize) -> std::result::Result<(), JinjaError> {
    let not_json = |what: &str| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {what} is not JSON serializable"));
    match v.kind() {
        ValueKind::Undefined => return Err(not_json("an undefined value")),
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i128::try_from(v.clone()) {
                if v.is_integer() {
                    out.push_str(&i.to_string());
                    return Ok(());
                }
            }
            let f = f64::try_from(v.clone()).map_err(|_| not_json("a number"))?;
            out.push_str(&python_float(f));
        }
        ValueKind::String => write_json_string(out, v.as_str().unwrap_or(""), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), o, depth, |out, i| write_json(out, &items[i], o, depth + 1))?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for k in v.try_iter()? {
                let name = match k.kind() {
                    ValueKind::String => k.as_str().unwrap_or("").to_string(),
                    ValueKind::Number | ValueKind::Bool | ValueKind::None => {
                        let mut s = String::new();
                        write_json(&mut s, &k, o, depth)?;
                        s
                    }
                    _ => return Err(not_json("a map key")),
                };
                let item = v.get_item(&k)?;
                entries.push((name, item));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), o, depth, |out, i| {
                write_json_string(out, &entries[i].0, o.ensure_ascii);
                out.push_str(&o.key);
                write_json(out, &entries[i].1, o, depth + 1)
            })?;
        }
        _ => return Err(not_json(&format!("a {} value", v.kind()))),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    n: usize,
    o: &JsonOptions,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), JinjaError>,
) -> std::result::Result<(), JinjaError> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..n {
        if i > 0 {
            out.push_str(&o.item);
        }
        if let Some(ind) = &o.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(ind) = &o.indent {
        out.push('\n');
        out.push_str(&ind.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` (and `json.dumps`) writes it: the shortest digits that read back, positional
/// for exponents from −4 to 15 (always with a fraction: `1.0`), else `1e-05` / `1.5e+16`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let e = format!("{f:e}"); // shortest round-trip digits: "-1.2345e-5"
    let (mantissa, exp) = e.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e}'s exponent is an integer");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// Seconds since the Unix epoch, now.
fn now_utc() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Python's `strftime` for the directives chat templates use, at `secs` since the epoch (UTC): `%d %m %Y %y
/// %H %M %S %j %b %B %a %A %p %%`; others are refused by name.
fn strftime(format: &str, secs: i64) -> std::result::Result<String, JinjaError> {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: the directive %{} is not supported", other.map_or(String::new(), String::from)),
                ))
            }
        }
    }
    Ok(out)
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a date (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> Vec<Message> {
        vec![Message::new("user", "Hi"), Message::new("assistant", "Hello!"), Message::new("user", "Bye")]
    }

    #[test]
    fn the_default_chatml_template_renders_plain_text_markers_and_the_generation_prompt() {
        let t = ChatTemplate::chatml();
        assert_eq!(
            t.render(&chat(), true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(t.is_default() && t.end_text() == Some("<|im_end|>"));
    }

    #[test]
    fn raise_exception_fails_the_rendering_with_its_message() {
        let t = ChatTemplate::new(
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok",
            SpecialTokens::default(),
        )
        .unwrap();
        let e = t.render(&[Message::new("system", "x")], false).unwrap_err().to_string();
        assert!(e.contains("System role not supported") && e.contains("refused the conversation"), "{e}");
        assert_eq!(t.render(&[Message::new("user", "x")], false).unwrap(), "ok");
    }

    #[test]
    fn a_template_that_does_not_compile_is_refused_naming_the_line() {
        let e = ChatTemplate::new("a\n{% for m in messages %}", SpecialTokens::default()).unwrap_err().to_string();
        assert!(e.contains("does not compile") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ y | tojson }}|{{ z | tojson(sort_keys=true) }}",
            SpecialTokens::default(),
        )
        .unwrap();
        let extra: BTreeMap<String, serde_json::Value> = [
            ("x".to_string(), serde_json::json!({"a": [1, 2.5, "é\"\n"], "b": null, "c": true, "d": {}})),
            ("y".to_string(), serde_json::json!([1e-5, 1e16, 0.1, 100.0, -3])),
            ("z".to_string(), serde_json::json!({"b": 1, "a": 2})),
        ]
        .into_iter()
        .collect();
        let out = t.render_with(&[], false, &extra).unwrap();
        // json.dumps({"a": [1, 2.5, "é\"\n"], "b": None, "c": True, "d": {}}) and with indent=2, in Python 3.11.
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, \"é\\\"\\n\"], \"b\": null, \"c\": true, \"d\": {}}|{\n  \"a\": [\n    1,\n    2.5,\n    \"é\\\"\\n\"\n  ],\n  \"b\": null,\n  \"c\": true,\n  \"d\": {}\n}|[1e-05, 1e+16, 0.1, 100.0, -3]|{\"a\": 2, \"b\": 1}"
        );
    }

    #[test]
    fn python_floats_switch_to_exponents_where_python_does() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456789012345.6, "123456789012345.6"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(python_float(f), want, "{f}");
        }
    }

    #[test]
    fn strftime_now_formats_dates_as_python_does() {
        // 2024-07-26 13:05:09 UTC (a Friday), as `datetime(2024, 7, 26, 13, 5, 9).strftime(…)` prints it.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%A %B %d, %y %H:%M:%S %p %j %%", t).unwrap(), "Friday July 26, 24 13:05:09 PM 208 %");
        assert_eq!(strftime("%a %m/%d/%Y", 0).unwrap(), "Thu 01/01/1970");
        assert!(strftime("%Z", t).unwrap_err().to_string().contains("%Z"));
    }

    #[test]
    fn generation_blocks_mark_the_bytes_they_render_and_keep_whitespace_control() {
        let src = "{% for m in messages %}{{ m.role }}:\n{%- if m.role == 'assistant' %}\n  {%- generation %} {{ m.content }}!{% endgeneration %}\n{%- else %} {{ m.content }}{% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, SpecialTokens::default()).unwrap();
        assert!(t.has_generation_marks());
        let (text, spans) = t.render_marked(&chat(), false).unwrap();
        // What transformers renders and returns as generation indices for the same template and messages
        // (Jinja2 3.1.6: `render_jinja_template(..., return_assistant_tokens_mask=True)`).
        assert_eq!(text, "user: Hiassistant: Hello!!user: Bye");
        assert_eq!(spans, vec![18..26]);
        assert_eq!(&text[spans[0].clone()], " Hello!!");
        // Messages may not carry the marks themselves.
        let e = t.render(&[Message::new("user", "a\u{F8F0}b")], false).unwrap_err().to_string();
        assert!(e.contains("messages[0].content"), "{e}");
    }

    #[test]
    fn special_tokens_are_strings_or_added_token_objects_and_unset_ones_are_undefined() {
        let cfg = serde_json::json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null});
        let s = SpecialTokens::from_config(&cfg, "tokenizer_config.json").unwrap();
        assert_eq!((s.bos.as_deref(), s.eos.as_deref(), s.pad.as_deref()), (Some("<s>"), Some("</s>"), None));
        let t = ChatTemplate::new("{{ bos_token }}|{{ pad_token is defined }}|{{ tools is none }}", s).unwrap();
        // Jinja2 prints booleans as Python does.
        assert_eq!(t.render(&[], false).unwrap(), "<s>|False|True");
        let e = SpecialTokens::from_config(&serde_json::json!({"eos_token": 3}), "tokenizer_config.json").unwrap_err().to_string();
        assert!(e.contains("eos_token") && e.contains('3'), "{e}");
    }
}
