//! One completion's text as it streams, split into reasoning, content and tool calls.

use serde_json::{json, Map, Value as Json};

use crate::engine::FinishReason;
use crate::parsers::{ReasoningParser, ToolCallDelta, ToolCallParser};

use crate::api::generation::finish_reason_str;

/// One completion's output, split as it streams.
pub(super) struct ChoiceParser {
    pub(super) reasoning: Option<ReasoningParser>,
    pub(super) tools: Option<ToolCallParser>,
    pub(super) parallel: bool,
    pub(super) num_calls: usize,
}

#[derive(Debug, Default)]
pub(super) struct ChoiceDelta {
    pub(super) reasoning: String,
    pub(super) content: String,
    pub(super) tool_calls: Vec<ToolCallDelta>,
}

impl ChoiceDelta {
    pub(super) fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }
}

impl ChoiceParser {
    pub(super) fn push(&mut self, text: &str) -> ChoiceDelta {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let d = r.push(text);
                (d.reasoning, d.content)
            }
            None => (String::new(), text.to_string()),
        };
        self.route(reasoning, content, false)
    }

    pub(super) fn finish(&mut self) -> ChoiceDelta {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let d = r.finish();
                (d.reasoning, d.content)
            }
            None => (String::new(), String::new()),
        };
        self.route(reasoning, content, true)
    }

    fn route(&mut self, reasoning: String, content: String, at_end: bool) -> ChoiceDelta {
        let mut delta = ChoiceDelta {
            reasoning,
            ..ChoiceDelta::default()
        };
        match &mut self.tools {
            Some(tools) => {
                let mut parsed = tools.push(&content);
                if at_end {
                    let tail = tools.finish();
                    parsed.content += &tail.content;
                    parsed.calls.extend(tail.calls);
                }
                delta.content = parsed.content;
                // Without parallel calls only the first call stands.
                delta.tool_calls = parsed
                    .calls
                    .into_iter()
                    .filter(|c| self.parallel || c.index == 0)
                    .collect();
                self.num_calls = tools
                    .num_calls()
                    .min(if self.parallel { usize::MAX } else { 1 });
            }
            None => delta.content = content,
        }
        delta
    }

    pub(super) fn finish_reason(&self, reason: FinishReason) -> &'static str {
        if reason == FinishReason::Stop && self.num_calls > 0 {
            "tool_calls"
        } else {
            finish_reason_str(reason)
        }
    }
}

pub(super) fn tool_call_json(c: &ToolCallDelta) -> Json {
    let mut function = Map::new();
    if let Some(name) = &c.name {
        function.insert("name".into(), json!(name));
    }
    function.insert("arguments".into(), json!(c.arguments));
    let mut call = Map::new();
    call.insert("index".into(), json!(c.index));
    if let Some(id) = &c.id {
        call.insert("id".into(), json!(id));
        call.insert("type".into(), json!("function"));
    }
    call.insert("function".into(), Json::Object(function));
    Json::Object(call)
}

/// Whole tool calls from their deltas.
pub(super) fn merge_calls(deltas: &[ToolCallDelta]) -> Vec<Json> {
    let mut calls: Vec<Json> = Vec::new();
    for d in deltas {
        if let (Some(id), Some(name)) = (&d.id, &d.name) {
            calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": d.arguments},
            }));
        } else if let Some(call) = calls.last_mut() {
            if let Some(Json::String(args)) = call.pointer_mut("/function/arguments") {
                args.push_str(&d.arguments);
            }
        }
    }
    calls
}
