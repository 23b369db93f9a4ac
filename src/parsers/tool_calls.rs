//! Qwen (Hermes-style) tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! blocks in the output become OpenAI tool calls; text outside them stays content. Streaming
//! announces a call (id, name) as soon as its name is readable and sends its arguments when the
//! block closes. A block that is not valid JSON stays content, as the model wrote it.

use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value as Json;

use super::partial_marker_len;

pub const TOOL_CALL_START: &str = "<tool_call>";
pub const TOOL_CALL_END: &str = "</tool_call>";

/// The early name is looked for only in a call's first bytes, which keeps the parser linear.
const MAX_NAME_SCAN: usize = 512;

/// One piece of one tool call. The first piece of a call carries `id` and `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// What one step of output became.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolParse {
    pub content: String,
    pub calls: Vec<ToolCallDelta>,
}

#[derive(Debug, Clone)]
struct OpenCall {
    body: String,
    /// Set once the call was announced (its id and name sent).
    announced: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ToolCallParser {
    pending: String,
    open: Option<OpenCall>,
    num_calls: usize,
}

impl Default for ToolCallParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self {
            pending: String::new(),
            open: None,
            num_calls: 0,
        }
    }

    /// Calls found so far.
    pub fn num_calls(&self) -> usize {
        self.num_calls
    }

    pub fn push(&mut self, text: &str) -> ToolParse {
        self.pending.push_str(text);
        let mut out = ToolParse::default();
        loop {
            match self.open.take() {
                None => {
                    if let Some(at) = self.pending.find(TOOL_CALL_START) {
                        out.content.push_str(&self.pending[..at]);
                        self.pending.drain(..at + TOOL_CALL_START.len());
                        self.open = Some(OpenCall {
                            body: String::new(),
                            announced: None,
                        });
                        continue;
                    }
                    let ready =
                        self.pending.len() - partial_marker_len(&self.pending, TOOL_CALL_START);
                    out.content.push_str(&self.pending[..ready]);
                    self.pending.drain(..ready);
                    return out;
                }
                Some(mut call) => {
                    if let Some(at) = self.pending.find(TOOL_CALL_END) {
                        call.body.push_str(&self.pending[..at]);
                        self.pending.drain(..at + TOOL_CALL_END.len());
                        self.close(call, true, &mut out);
                        continue;
                    }
                    let ready =
                        self.pending.len() - partial_marker_len(&self.pending, TOOL_CALL_END);
                    call.body.push_str(&self.pending[..ready]);
                    self.pending.drain(..ready);
                    if call.announced.is_none() && call.body.len() <= MAX_NAME_SCAN {
                        if let Some(name) = early_name(&call.body) {
                            let id = new_call_id();
                            out.calls.push(ToolCallDelta {
                                index: self.num_calls,
                                id: Some(id.clone()),
                                name: Some(name.to_string()),
                                arguments: String::new(),
                            });
                            call.announced = Some(id);
                        }
                    }
                    self.open = Some(call);
                    return out;
                }
            }
        }
    }

    /// The end of the output. An unclosed block still counts as a call when it is complete JSON
    /// (the model may stop right after it).
    pub fn finish(&mut self) -> ToolParse {
        let mut out = ToolParse::default();
        match self.open.take() {
            Some(mut call) => {
                call.body.push_str(&std::mem::take(&mut self.pending));
                self.close(call, false, &mut out);
            }
            None => out.content = std::mem::take(&mut self.pending),
        }
        out
    }

    fn close(&mut self, call: OpenCall, closed: bool, out: &mut ToolParse) {
        match parse_call(&call.body) {
            Some((name, arguments)) => {
                let first = call.announced.is_none();
                out.calls.push(ToolCallDelta {
                    index: self.num_calls,
                    id: first.then(new_call_id),
                    name: first.then_some(name),
                    arguments,
                });
                self.num_calls += 1;
            }
            None if call.announced.is_some() => {
                // Announced but broken: the call stands with what arguments there are.
                tracing::debug!("tool call with invalid JSON: {:?}", call.body);
                self.num_calls += 1;
            }
            None => {
                out.content.push_str(TOOL_CALL_START);
                out.content.push_str(&call.body);
                if closed {
                    out.content.push_str(TOOL_CALL_END);
                }
            }
        }
    }
}

fn new_call_id() -> String {
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// The function name of a body that starts `{"name": "…"`, once its closing quote is there.
fn early_name(body: &str) -> Option<&str> {
    let rest = body
        .trim_start()
        .strip_prefix('{')?
        .trim_start()
        .strip_prefix("\"name\"")?
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find(['"', '\\'])?;
    (rest.as_bytes()[end] == b'"' && end > 0).then(|| &rest[..end])
}

/// (name, arguments as a JSON string) of a complete call body.
fn parse_call(body: &str) -> Option<(String, String)> {
    let value: Json = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(Json::Null) => "{}".to_string(),
        Some(Json::String(s)) => s.clone(),
        Some(args) => args.to_string(),
    };
    Some((name, arguments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mut p: ToolCallParser, pieces: &[&str]) -> ToolParse {
        let mut all = ToolParse::default();
        let mut parsed: Vec<ToolParse> = pieces.iter().map(|s| p.push(s)).collect();
        parsed.push(p.finish());
        for piece in parsed {
            all.content += &piece.content;
            all.calls.extend(piece.calls);
        }
        all
    }

    /// Merges the deltas of each call: (name, arguments).
    fn merged(calls: &[ToolCallDelta]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for d in calls {
            if d.index == out.len() {
                assert!(d.id.as_deref().is_some_and(|id| id.starts_with("call_")));
                out.push((d.name.clone().unwrap_or_default(), String::new()));
            } else {
                assert!(
                    d.id.is_none() && d.name.is_none(),
                    "only the first delta names"
                );
            }
            out[d.index].1 += &d.arguments;
        }
        out
    }

    const TEXT: &str = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";

    #[test]
    fn whole_and_streamed_agree() {
        let whole = run(ToolCallParser::new(), &[TEXT]);
        assert_eq!(whole.content, "Let me check.\n\n");
        let expected = vec![
            ("get_weather".to_string(), r#"{"city":"Paris"}"#.to_string()),
            ("get_time".to_string(), "{}".to_string()),
        ];
        assert_eq!(merged(&whole.calls), expected);
        let chars: Vec<String> = TEXT.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        let streamed = run(ToolCallParser::new(), &pieces);
        assert_eq!(streamed.content, whole.content);
        assert_eq!(merged(&streamed.calls), expected);
        // Streamed, the first call is announced before its arguments arrive.
        assert_eq!(streamed.calls[0].arguments, "");
    }

    #[test]
    fn invalid_json_stays_content() {
        let text = "a <tool_call>{not json}</tool_call> b";
        let out = run(ToolCallParser::new(), &[text]);
        assert_eq!(out.content, text);
        assert!(out.calls.is_empty());
        let out = run(ToolCallParser::new(), &["<tool_call>{\"na"]);
        assert_eq!(out.content, "<tool_call>{\"na");
    }

    #[test]
    fn unclosed_complete_call_counts() {
        let out = run(
            ToolCallParser::new(),
            &["<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}"],
        );
        assert_eq!(merged(&out.calls), vec![("f".into(), r#"{"x":1}"#.into())]);
    }

    #[test]
    fn linear_on_adversarial_output() {
        // Many almost-markers and a huge unterminated call: each byte is looked at a bounded
        // number of times, so this finishes at once rather than in O(n^2).
        let mut p = ToolCallParser::new();
        for _ in 0..20_000 {
            p.push("<tool_cal");
            p.push("x ");
        }
        p.push("<tool_call>");
        for _ in 0..20_000 {
            p.push("{\"a\": [1, 2, </tool_cal");
        }
        let out = p.finish();
        assert!(out.content.starts_with("<tool_call>"));
        assert_eq!(p.num_calls(), 0);
    }
}
