//! Structured output on the wire: `response_format` (OpenAI), `structured_outputs` (vLLM's
//! extension) and `tool_choice` become one grammar, compiled on the preprocessing threads
//! before the request reaches the engine. A grammar llguidance refuses is a 400 naming the
//! parameter and the reason; one too large is refused before compiling.

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use super::error::ApiError;
use super::types::ToolDefinition;
use crate::engine::detokenizer::TokenBytes;
use crate::engine::grammar::with_json_options;
use crate::engine::{ConstraintStart, GrammarCompiler, GrammarSpec, ValidConstraint};
use crate::parsers::{THINK_END, THINK_START, TOOL_CALL_START};

/// Most bytes of a schema, regex or grammar, before llguidance sees it (its own limits bound
/// the compiled size and the lexer's work).
pub const MAX_GRAMMAR_BYTES: usize = 256 << 10;

/// The grammar compiler of the loaded tokenizer, built once on first use (the token trie of a
/// 152k vocabulary takes a fraction of a second; the server starts without waiting for it).
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    compiler: OnceLock<Result<GrammarCompiler, String>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos_token_ids: Vec<u32>) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos_token_ids,
            compiler: OnceLock::new(),
        }
    }

    fn compiler(&self, param: &str) -> Result<&GrammarCompiler, ApiError> {
        self.compiler
            .get_or_init(|| {
                let table = TokenBytes::new(&self.tokenizer).ok_or_else(|| {
                    "needs a byte-level tokenizer (every Qwen tokenizer is one)".to_string()
                })?;
                GrammarCompiler::new(&table, self.vocab_size, &self.eos_token_ids)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|why| ApiError::unsupported(param, &format!("cannot be served: {why}")))
    }

    /// Builds the compiler now (for a thread at start-up, so the first request need not).
    pub fn warm(&self) {
        let started = std::time::Instant::now();
        match self.compiler("response_format") {
            Ok(_) => tracing::info!(
                vocab_size = self.vocab_size,
                seconds = started.elapsed().as_secs_f32(),
                "grammar compiler ready"
            ),
            Err(e) => tracing::warn!("structured output is unavailable: {}", e.message),
        }
    }
}

/// A request's grammar before compiling, with the parameter it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct GrammarRequest {
    pub spec: GrammarSpec,
    pub param: String,
}

impl GrammarRequest {
    fn new(spec: GrammarSpec, param: impl Into<String>) -> Self {
        Self {
            spec,
            param: param.into(),
        }
    }

    /// Compiles on the calling (preprocessing) thread.
    pub fn compile(
        &self,
        grammars: &Grammars,
        start: ConstraintStart,
    ) -> Result<ValidConstraint, ApiError> {
        let param = self.param.as_str();
        let size = match &self.spec {
            GrammarSpec::JsonSchema(s) => serde_json::to_string(s).map_or(usize::MAX, |s| s.len()),
            GrammarSpec::JsonObject => 0,
            GrammarSpec::Regex(s) | GrammarSpec::Lark(s) => s.len(),
            GrammarSpec::Choice(c) => c.iter().map(String::len).sum(),
        };
        if size > MAX_GRAMMAR_BYTES {
            return Err(ApiError::invalid(
                param,
                format!("Invalid '{param}': {size} bytes; at most {MAX_GRAMMAR_BYTES}"),
            ));
        }
        let grammar = grammars
            .compiler(param)?
            .compile(&self.spec)
            .map_err(|e| ApiError::invalid(param, format!("Invalid '{param}': {e}")))?;
        Ok(ValidConstraint { grammar, start })
    }
}

/// Where the grammar starts in a chat answer: after the think block the prompt opened, or
/// from the first token, which may open a think block instead (Qwen3 thinking).
pub fn chat_start(
    tokenizer: &Tokenizer,
    reasoning: bool,
    prompt_opens_think: bool,
) -> ConstraintStart {
    let think = tokenizer
        .token_to_id(THINK_START)
        .zip(tokenizer.token_to_id(THINK_END))
        .filter(|_| reasoning);
    match think {
        Some((_, end)) if prompt_opens_think => ConstraintStart::After(end),
        think => ConstraintStart::Now { think },
    }
}

/// The grammar `response_format` asks for (None for text or when absent).
pub fn from_response_format(format: Option<&Json>) -> Result<Option<GrammarRequest>, ApiError> {
    let Some(format) = format else {
        return Ok(None);
    };
    match format.get("type").and_then(Json::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarRequest::new(
            GrammarSpec::JsonObject,
            "response_format",
        ))),
        Some("json_schema") => {
            let param = "response_format.json_schema.schema";
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        param,
                        "'response_format' of type 'json_schema' needs 'json_schema.schema'",
                    )
                })?;
            Ok(Some(GrammarRequest::new(
                GrammarSpec::JsonSchema(schema_value(schema, param)?),
                param,
            )))
        }
        _ => Err(ApiError::invalid(
            "response_format",
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
        )),
    }
}

/// A schema given as an object (or, as vLLM allows, as a string holding one).
fn schema_value(schema: &Json, param: &str) -> Result<Json, ApiError> {
    let schema = match schema {
        Json::String(text) => serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(param, format!("Invalid '{param}': not JSON: {e}")))?,
        other => other.clone(),
    };
    match schema {
        Json::Object(_) | Json::Bool(_) => Ok(schema),
        _ => Err(ApiError::invalid(
            param,
            format!("Invalid '{param}': a JSON schema is an object"),
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object.
pub fn from_structured_outputs(value: Option<&Json>) -> Result<Option<GrammarRequest>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let Json::Object(map) = value else {
        return Err(ApiError::invalid(
            "structured_outputs",
            "'structured_outputs' must be an object",
        ));
    };
    let mut found = Vec::new();
    let mut compact = false;
    for (key, v) in map.iter().filter(|(_, v)| !v.is_null()) {
        let param = format!("structured_outputs.{key}");
        let text = || {
            v.as_str().map(str::to_string).ok_or_else(|| {
                ApiError::invalid(param.clone(), format!("'{param}' must be a string"))
            })
        };
        let spec = match key.as_str() {
            "json" => GrammarSpec::JsonSchema(schema_value(v, &param)?),
            "regex" => GrammarSpec::Regex(text()?),
            "grammar" => GrammarSpec::Lark(text()?),
            "choice" => GrammarSpec::Choice(
                v.as_array()
                    .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
                    .filter(|c: &Vec<String>| !c.is_empty())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            param.clone(),
                            format!("'{param}' must be a non-empty list of strings"),
                        )
                    })?,
            ),
            "json_object" => match v.as_bool() {
                Some(true) => GrammarSpec::JsonObject,
                Some(false) => continue,
                None => return Err(ApiError::invalid(param, "must be true or false")),
            },
            "disable_any_whitespace" => {
                compact = v
                    .as_bool()
                    .ok_or_else(|| ApiError::invalid(param, "must be true or false"))?;
                continue;
            }
            _ => {
                return Err(ApiError::unsupported(
                    param,
                    "is not supported; use json, regex, choice, grammar or json_object.",
                ))
            }
        };
        found.push(GrammarRequest::new(spec, param));
    }
    let mut found = match found.len() {
        1 => found.remove(0),
        0 => {
            return Err(ApiError::invalid(
                "structured_outputs",
                "'structured_outputs' needs one of json, regex, choice, grammar or json_object",
            ))
        }
        _ => return Err(ApiError::invalid(
            "structured_outputs",
            "'structured_outputs' takes only one of json, regex, choice, grammar or json_object",
        )),
    };
    if compact {
        found.spec = match found.spec {
            GrammarSpec::JsonSchema(s) => GrammarSpec::JsonSchema(without_whitespace(s)),
            GrammarSpec::JsonObject => {
                GrammarSpec::JsonSchema(without_whitespace(json!({"type": "object"})))
            }
            other => other,
        };
    }
    Ok(Some(found))
}

/// A schema whose JSON has no whitespace between tokens (vLLM's `disable_any_whitespace`).
fn without_whitespace(mut schema: Json) -> Json {
    if let Json::Object(map) = &mut schema {
        map.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// At most one of the ways to ask for structured output.
pub fn one_of(
    found: impl IntoIterator<Item = Option<GrammarRequest>>,
) -> Result<Option<GrammarRequest>, ApiError> {
    let mut found: Vec<GrammarRequest> = found.into_iter().flatten().collect();
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(ApiError::invalid(
            found[1].param.clone(),
            format!(
                "'{}' and '{}' both constrain the output; give one",
                found[0].param, found[1].param
            ),
        )),
    }
}

/// The schema of one call to `tool` as Qwen writes it: `{"name": ..., "arguments": {...}}`.
fn call_schema(tool: &ToolDefinition, strict_arguments: bool) -> Json {
    let arguments = match &tool.function.parameters {
        Some(p) if strict_arguments => p.clone(),
        _ => json!({"type": "object"}),
    };
    json!({
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": false
    })
}

fn calls_schema(tools: &[&ToolDefinition], strict: impl Fn(&ToolDefinition) -> bool) -> Json {
    let mut schemas: Vec<Json> = tools.iter().map(|t| call_schema(t, strict(t))).collect();
    let schema = if schemas.len() == 1 {
        schemas.remove(0)
    } else {
        json!({"anyOf": schemas})
    };
    with_json_options(schema)
}

/// A Lark string literal (JSON's escapes are Lark's).
fn lark_literal(text: &str) -> String {
    Json::String(text.to_string()).to_string()
}

/// tool_choice "required" (`name` None) or a named function: the output is one call (or
/// several, with `parallel`) in Qwen's `<tool_call>` wrapper, each naming one of the tools and
/// with arguments that match its parameters' schema.
pub fn forced_calls(
    tools: &[ToolDefinition],
    name: Option<&str>,
    parallel: bool,
) -> GrammarRequest {
    let chosen: Vec<&ToolDefinition> = tools
        .iter()
        .filter(|t| name.is_none_or(|n| t.function.name == n))
        .collect();
    let schema = calls_schema(&chosen, |_| true);
    let open = lark_literal(&format!("{TOOL_CALL_START}\n"));
    let close = lark_literal(&format!("\n{}", crate::parsers::TOOL_CALL_END));
    let start = if parallel {
        "start: call (\"\\n\" call)*"
    } else {
        "start: call"
    };
    GrammarRequest::new(
        GrammarSpec::Lark(format!("{start}\ncall: {open} %json {schema} {close}\n")),
        "tool_choice",
    )
}

/// tool_choice "auto" with a tool marked `strict`: once the model opens a call (the
/// `<tool_call>` token), the call must name a tool and a strict tool's arguments must match
/// its schema; None when no tool is strict.
pub fn strict_calls(tools: &[ToolDefinition]) -> Option<GrammarRequest> {
    let is_strict = |t: &ToolDefinition| t.function.strict == Some(true);
    if !tools.iter().any(is_strict) {
        return None;
    }
    let all: Vec<&ToolDefinition> = tools.iter().collect();
    let schema = calls_schema(&all, is_strict);
    let close = lark_literal(&format!("\n{}", crate::parsers::TOOL_CALL_END));
    Some(GrammarRequest::new(
        GrammarSpec::Lark(format!("start: \"\\n\" %json {schema} {close}\n")),
        "tools",
    ))
}

/// The token that opens a tool call, for `strict_calls`.
pub fn tool_call_token(tokenizer: &Tokenizer) -> Result<u32, ApiError> {
    tokenizer.token_to_id(TOOL_CALL_START).ok_or_else(|| {
        ApiError::unsupported(
            "tools",
            "with 'strict': true needs a tokenizer with a '<tool_call>' token.",
        )
    })
}
