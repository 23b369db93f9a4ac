//! Chat templates from tokenizer_config.json, rendered with minijinja the way transformers'
//! `apply_chat_template` renders them with Jinja2: trim_blocks and lstrip_blocks on, Python
//! string methods (pycompat), `tojson` formatted like Python's `json.dumps`, `raise_exception`.
//! Rendering is bounded by fuel so a hostile template cannot hang the process, and its output
//! by a byte budget (`RenderOptions::max_bytes`).

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;

/// Instructions a render may execute; generous for real conversations (a 1,000-message chat with
/// tools takes well under a tenth of this), small enough to stop a runaway loop within a second.
pub const DEFAULT_FUEL: u64 = 20_000_000;

const TEMPLATE_NAME: &str = "chat";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no chat template: {0}")]
    Missing(String),
    #[error("invalid chat template: {0}")]
    Invalid(String),
    #[error("chat template failed: {0}")]
    Render(String),
    #[error("the rendered prompt is over the limit of {0} bytes")]
    TooLarge(usize),
}

/// What the caller passes to the template besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// OpenAI-style tool definitions, passed as `tools`.
    pub tools: Option<Json>,
    /// Qwen3's switch; not passed when `None` so the template's default applies.
    pub enable_thinking: Option<bool>,
    /// The render stops with [`TemplateError::TooLarge`] past this many bytes of output.
    pub max_bytes: Option<usize>,
}

/// The render's output, refusing to grow past its budget.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(std::io::Error::other("output budget exceeded"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json is a string or `{"content": ...}`.
fn token_string(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(String::from),
        _ => None,
    }
}

impl ChatTemplate {
    /// Reads `chat_template` (a string, or a list of named templates: "default" is used) and the
    /// bos/eos tokens from tokenizer_config.json.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TemplateError::Invalid(format!("{}: {e}", path.display())))?;
        let config: Json = serde_json::from_str(&text)
            .map_err(|e| TemplateError::Invalid(format!("{}: {e}", path.display())))?;
        let source = match config.get("chat_template") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(String::from)
                .ok_or_else(|| TemplateError::Missing("no template named \"default\"".into()))?,
            _ => {
                return Err(TemplateError::Missing(format!(
                    "{} has no chat_template",
                    path.display()
                )))
            }
        };
        Self::new(
            source,
            token_string(config.get("bos_token")),
            token_string(config.get("eos_token")),
        )
    }

    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(DEFAULT_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (a JSON array of OpenAI-style messages).
    pub fn render(&self, messages: &Json, opts: &RenderOptions) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Invalid(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(opts.add_generation_prompt),
        );
        if let Some(tools) = &opts.tools {
            ctx.insert("tools".into(), tools.clone());
        }
        if let Some(enable) = opts.enable_thinking {
            ctx.insert("enable_thinking".into(), Json::Bool(enable));
        }
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token".into(), Json::String(bos.clone()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token".into(), Json::String(eos.clone()));
        }
        let limit = opts.max_bytes.unwrap_or(usize::MAX);
        let mut out = Bounded {
            out: Vec::new(),
            limit,
        };
        match template.render_captured_to(Value::from_serialize(&ctx), &mut out) {
            Ok(_) => String::from_utf8(out.out).map_err(|e| TemplateError::Render(e.to_string())),
            Err(e) if e.kind() == ErrorKind::WriteFailure => Err(TemplateError::TooLarge(limit)),
            Err(e) => Err(TemplateError::Render(render_error_message(&e))),
        }
    }
}

fn render_error_message(e: &JinjaError) -> String {
    match e.kind() {
        ErrorKind::OutOfFuel => "the template ran too long and was stopped".to_string(),
        _ => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|e| JinjaError::new(ErrorKind::BadSerialization, e.to_string()))?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let style = PyJson {
        indent,
        item_sep: &item_sep,
        key_sep: &key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    style.write(&json, 0, &mut out);
    // Like Jinja2's, the result is safe: the template's autoescape (off here) must not touch it.
    Ok(Value::from_safe_string(out))
}

struct PyJson<'a> {
    indent: Option<usize>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    }

    fn write(&self, value: &Json, depth: usize, out: &mut String) {
        match value {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&python_number(n)),
            // serde_json escapes exactly what Python's json.dumps(ensure_ascii=False) escapes.
            Json::String(s) => out.push_str(&Json::String(s.clone()).to_string()),
            Json::Array(items) if items.is_empty() => out.push_str("[]"),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Json::Object(map) if map.is_empty() => out.push_str("{}"),
            Json::Object(map) => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    out.push_str(&Json::String(key.clone()).to_string());
                    out.push_str(self.key_sep);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }
}

/// Python's `repr` of a JSON number: integers as is, floats with a `.0` when integral and
/// exponents in Python's style (1e-05, 1e+20).
fn python_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr does.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: Json) -> Result<String, TemplateError> {
        ChatTemplate::new(source.to_string(), None, None)?
            .render(&messages, &RenderOptions::default())
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let out = render(
            "{{ messages[0] | tojson }}",
            json!([{"b": 1, "a": [1.5, 2.0, "x\"y", null, true], "c": {}, "d": "é\n", "e": 1e-5}]),
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"b": 1, "a": [1.5, 2.0, "x\"y", null, true], "c": {}, "d": "é\n", "e": 1e-05}"#
        );
        let out = render(
            "{{ messages[0] | tojson(indent=2) }}",
            json!([{"a": [1, 2]}]),
        )
        .unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let err = render("{{ raise_exception('bad role') }}", json!([])).unwrap_err();
        assert!(err.to_string().contains("bad role"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let out = render(
            "{{ messages[0].strip().split(',')[1].lstrip() }}|{{ messages[0].startswith(' a') }}",
            json!([" a, b "]),
        )
        .unwrap();
        assert_eq!(out, "b|True"); // as Jinja2 prints a Python bool
    }

    #[test]
    fn a_runaway_template_is_stopped() {
        let start = std::time::Instant::now();
        let err = render(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            json!([]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        assert!(start.elapsed().as_secs() < 30);
    }

    /// A template that repeats a message (few instructions, much output) stops at the byte
    /// budget; an output within it renders whole.
    #[test]
    fn output_is_bounded_by_its_budget() {
        let t = ChatTemplate::new(
            "{% for i in range(1000) %}{{ messages[0] }}{% endfor %}".to_string(),
            None,
            None,
        )
        .unwrap();
        let messages = json!(["x".repeat(1000)]);
        let opts = |max| RenderOptions {
            max_bytes: Some(max),
            ..Default::default()
        };
        let err = t.render(&messages, &opts(100_000)).unwrap_err();
        assert!(matches!(err, TemplateError::TooLarge(100_000)), "{err}");
        assert_eq!(
            t.render(&messages, &opts(1_000_000)).unwrap().len(),
            1_000_000
        );
    }
}
