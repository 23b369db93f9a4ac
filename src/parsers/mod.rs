//! Parsers that split a model's output text as it streams: Qwen3 reasoning (`<think>…</think>`)
//! and Qwen tool calls (`<tool_call>{json}</tool_call>`). Both see each byte a bounded number
//! of times, so adversarial output cannot make them quadratic.

mod reasoning;
mod tool_calls;

pub use reasoning::{ReasoningDelta, ReasoningParser, THINK_END, THINK_START};
pub use tool_calls::{ToolCallDelta, ToolCallParser, ToolParse, TOOL_CALL_END, TOOL_CALL_START};

/// Length of the longest proper prefix of `marker` that `text` ends with: bytes to hold back
/// because the next piece of text may complete the marker. Markers are ASCII.
fn partial_marker_len(text: &str, marker: &str) -> usize {
    let max = marker.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| text.as_bytes().ends_with(&marker.as_bytes()[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::partial_marker_len;

    #[test]
    fn partial_markers() {
        assert_eq!(partial_marker_len("abc<tool", "<tool_call>"), 5);
        assert_eq!(partial_marker_len("abc<", "<tool_call>"), 1);
        assert_eq!(partial_marker_len("abc", "<tool_call>"), 0);
        assert_eq!(partial_marker_len("", "<tool_call>"), 0);
        assert_eq!(
            partial_marker_len("x<tool_call>", "<tool_call>"),
            0,
            "whole marker"
        );
        assert_eq!(partial_marker_len("日本<", "<think>"), 1);
    }
}
