//! OpenAI request bodies as sent on the wire, and the parsing that turns a body into one:
//! unknown fields are refused by name, type errors name the field's path.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value as Json;

use super::error::ApiError;

/// Parses a JSON body into `T`. Fields not in `known` are refused unless they are null (which
/// means "not given" to OpenAI clients).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8], known: &[&str]) -> Result<T, ApiError> {
    typed(parse_object(bytes, known)?)
}

/// A route's body with the common parameters (serde's flatten would lose the error paths).
pub trait WithCommon: DeserializeOwned {
    fn set_common(&mut self, common: CommonParams);
}

pub fn parse_with_common<T: WithCommon>(bytes: &[u8], known: &[&str]) -> Result<T, ApiError> {
    let value = parse_object(bytes, known)?;
    let common: CommonParams = typed(&value)?;
    let mut body: T = typed(value)?;
    body.set_common(common);
    Ok(body)
}

fn typed<'de, T: Deserialize<'de>>(
    value: impl serde::Deserializer<'de, Error = serde_json::Error>,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.inner().to_string();
        let path = match missing_field(&inner) {
            // The missing field is the parameter at fault, not the object around it.
            Some(field) if e.path().iter().next().is_none() => field.to_string(),
            Some(field) => format!("{}.{field}", e.path()),
            None => e.path().to_string(),
        };
        let why = without_values(&inner);
        ApiError::invalid(path.clone(), format!("Invalid '{path}': {why}"))
    })
}

/// The field of serde's "missing field `name`" message (a name from our own types).
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// A serde message without the request's own strings: `invalid type: string "…", expected …`
/// and `unknown variant `…`, expected …` name the value they refused, and an error must not
/// echo raw input back (it may be markup, a secret, or a terminal escape).
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // A Debug-quoted string: drop it and the space before it.
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                if out.ends_with(' ') {
                    out.pop();
                }
            }
            '`' if out.ends_with("unknown variant ") || out.ends_with("unknown field ") => {
                for c in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                }
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn parse_object(bytes: &[u8], known: &[&str]) -> Result<Json, ApiError> {
    let value: Json = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_body(format!("The body is not valid JSON: {e}")))?;
    let Json::Object(map) = &value else {
        return Err(ApiError::bad_body("The body must be a JSON object."));
    };
    if let Some((field, _)) = map
        .iter()
        .find(|(k, v)| !v.is_null() && !known.contains(&k.as_str()))
    {
        return Err(ApiError::unsupported(
            field.clone(),
            "is not supported by this server.",
        ));
    }
    Ok(value)
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// vLLM's extension (guidellm sends it): with include_usage, every chunk carries the usage
    /// so far.
    pub continuous_usage_stats: Option<bool>,
}

/// Parameters chat and completions share, with vLLM's extensions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopField>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub user: Option<String>,
    // vLLM extensions.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub min_tokens: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub return_tokens_as_token_ids: Option<bool>,
}

pub const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "return_tokens_as_token_ids",
];

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    #[serde(skip)]
    pub common: CommonParams,
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<ToolDefinition>>,
    pub tool_choice: Option<Json>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Json>,
    /// vLLM's structured-output extension.
    pub structured_outputs: Option<Json>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Json>>,
}

impl WithCommon for ChatRequest {
    fn set_common(&mut self, common: CommonParams) {
        self.common = common;
    }
}

pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "structured_outputs",
    "chat_template",
    "chat_template_kwargs",
];

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<Json>>,
    pub tool_call_id: Option<String>,
    pub reasoning_content: Option<String>,
    /// Fields a client may echo back from a response (refusal, audio, ...): refused unless null.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Json>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolDefinition {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    #[serde(skip)]
    pub common: CommonParams,
    pub prompt: PromptField,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub response_format: Option<Json>,
    /// vLLM's structured-output extension.
    pub structured_outputs: Option<Json>,
}

impl WithCommon for CompletionRequest {
    fn set_common(&mut self, common: CommonParams) {
        self.common = common;
    }
}

pub const COMPLETION_FIELDS: &[&str] = &[
    "prompt",
    "logprobs",
    "echo",
    "best_of",
    "response_format",
    "structured_outputs",
];

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl PromptField {
    /// How many prompts it holds.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(_) | Self::Tokens(_) => 1,
            Self::Texts(v) => v.len(),
            Self::TokenLists(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    /// As in chat completions: rendered into the prompt, so the count is chat's.
    pub tools: Option<Vec<ToolDefinition>>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Json>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(extra: &[&'static str]) -> Vec<&'static str> {
        COMMON_FIELDS.iter().chain(extra).copied().collect()
    }

    #[test]
    fn unknown_fields_are_named() {
        let known = fields(CHAT_FIELDS);
        let body = br#"{"messages": [], "frobnicate": 1}"#;
        let e = parse_with_common::<ChatRequest>(body, &known).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("frobnicate"));
        assert_eq!(e.status, 400);
        // null means not given
        let body = br#"{"messages": [], "frobnicate": null}"#;
        assert!(parse_with_common::<ChatRequest>(body, &known).is_ok());
    }

    #[test]
    fn type_errors_name_the_path() {
        let known = fields(CHAT_FIELDS);
        let body = br#"{"messages": [], "temperature": "hot"}"#;
        let e = parse_with_common::<ChatRequest>(body, &known).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = parse_with_common::<ChatRequest>(b"[1]", &known).unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_with_common::<ChatRequest>(b"{", &known).unwrap_err();
        assert!(e.message.contains("not valid JSON"));
    }

    #[test]
    fn prompt_shapes() {
        let known = fields(COMPLETION_FIELDS);
        for (body, want) in [
            (r#"{"prompt": "hi"}"#, "Text"),
            (r#"{"prompt": ["a", "b"]}"#, "Texts"),
            (r#"{"prompt": [1, 2]}"#, "Tokens"),
            (r#"{"prompt": [[1], [2, 3]]}"#, "TokenLists"),
        ] {
            let r: CompletionRequest = parse_with_common(body.as_bytes(), &known).unwrap();
            let got = match r.prompt {
                PromptField::Text(_) => "Text",
                PromptField::Texts(_) => "Texts",
                PromptField::Tokens(_) => "Tokens",
                PromptField::TokenLists(_) => "TokenLists",
            };
            assert_eq!(got, want);
        }
        let e = parse_with_common::<CompletionRequest>(br#"{"prompt": [-1]}"#, &known).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"), "{e:?}");
    }
}

#[cfg(test)]
mod value_free_messages {
    use super::without_values;

    #[test]
    fn request_strings_are_dropped_from_serde_messages() {
        assert_eq!(
            without_values(r#"invalid type: string "<script>\"x", expected a sequence"#),
            "invalid type: string, expected a sequence"
        );
        assert_eq!(
            without_values("unknown variant `sometimes`, expected `none` or `auto`"),
            "unknown variant, expected `none` or `auto`"
        );
        assert_eq!(
            without_values("missing field `function`"),
            "missing field `function`"
        );
    }
}
