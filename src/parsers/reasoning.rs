//! Qwen3 reasoning: the text inside `<think>…</think>` is reasoning, the rest is content.
//! The block either opens in the output or was already opened by the chat template at the
//! end of the prompt (thinking-only templates); an unclosed block is all reasoning.

use super::partial_marker_len;

pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// Leading bytes after which output that has not opened a think block is content.
const MAX_UNDECIDED: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting to see whether the output opens with `<think>`.
    Undecided,
    Reasoning,
    Content,
}

/// Text of one step, split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasoningDelta {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    /// Text held back: a possible marker prefix, or undecided leading text.
    pending: String,
    /// Drop whitespace between `</think>` and the answer.
    strip_leading: bool,
}

impl ReasoningParser {
    /// `opened_in_prompt`: the prompt ends inside a think block the template opened.
    pub fn new(opened_in_prompt: bool) -> Self {
        Self {
            state: if opened_in_prompt {
                State::Reasoning
            } else {
                State::Undecided
            },
            pending: String::new(),
            strip_leading: false,
        }
    }

    /// Whether a rendered prompt leaves a think block open for the model to continue.
    pub fn prompt_opens_block(prompt: &str) -> bool {
        match (prompt.rfind(THINK_START), prompt.rfind(THINK_END)) {
            (Some(open), Some(close)) => open > close,
            (Some(_), None) => true,
            _ => false,
        }
    }

    pub fn push(&mut self, text: &str) -> ReasoningDelta {
        self.pending.push_str(text);
        let mut out = ReasoningDelta::default();
        loop {
            match self.state {
                State::Undecided => {
                    let trimmed = self.pending.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_START) {
                        self.pending = rest.to_string();
                        self.state = State::Reasoning;
                    } else if THINK_START.starts_with(trimmed) && self.pending.len() < MAX_UNDECIDED
                    {
                        return out;
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => {
                    if let Some(at) = self.pending.find(THINK_END) {
                        out.reasoning.push_str(&self.pending[..at]);
                        self.pending.drain(..at + THINK_END.len());
                        self.state = State::Content;
                        self.strip_leading = true;
                        continue;
                    }
                    let ready = self.pending.len() - partial_marker_len(&self.pending, THINK_END);
                    out.reasoning.push_str(&self.pending[..ready]);
                    self.pending.drain(..ready);
                    return out;
                }
                State::Content => {
                    self.take_content(&mut out);
                    return out;
                }
            }
        }
    }

    /// The end of the output: releases what was held back.
    pub fn finish(&mut self) -> ReasoningDelta {
        let mut out = ReasoningDelta::default();
        match self.state {
            State::Reasoning => out.reasoning = std::mem::take(&mut self.pending),
            State::Undecided | State::Content => self.take_content(&mut out),
        }
        out
    }

    fn take_content(&mut self, out: &mut ReasoningDelta) {
        let text = std::mem::take(&mut self.pending);
        if self.strip_leading {
            let rest = text.trim_start();
            if rest.is_empty() {
                return;
            }
            self.strip_leading = false;
            out.content.push_str(rest);
        } else {
            out.content.push_str(&text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one at a time and returns (reasoning, content).
    fn run(opened: bool, pieces: &[&str]) -> (String, String) {
        let mut p = ReasoningParser::new(opened);
        let mut out = ReasoningDelta::default();
        for piece in pieces {
            let d = p.push(piece);
            out.reasoning += &d.reasoning;
            out.content += &d.content;
        }
        let d = p.finish();
        (out.reasoning + &d.reasoning, out.content + &d.content)
    }

    #[test]
    fn splits_a_think_block() {
        let whole = ("\nplan it\n".to_string(), "The answer.".to_string());
        assert_eq!(
            run(false, &["<think>\nplan it\n</think>\n\nThe answer."]),
            whole
        );
        // The same, one byte at a time (markers split across pieces).
        let text = "<think>\nplan it\n</think>\n\nThe answer.";
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(run(false, &pieces), whole);
    }

    #[test]
    fn without_a_block_all_is_content() {
        assert_eq!(
            run(false, &["Hello", " <thi", "nking> world"]),
            (String::new(), "Hello <thinking> world".into())
        );
        assert_eq!(run(false, &["<thi"]), (String::new(), "<thi".into()));
        assert_eq!(run(false, &["<"]), (String::new(), "<".into()));
    }

    #[test]
    fn a_block_opened_by_the_prompt() {
        assert_eq!(
            run(true, &["reason", "ing</th", "ink>answer"]),
            ("reasoning".into(), "answer".into())
        );
        assert_eq!(run(true, &["cut off"]), ("cut off".into(), String::new()));
        assert!(ReasoningParser::prompt_opens_block(
            "<|im_start|>assistant\n<think>\n"
        ));
        assert!(!ReasoningParser::prompt_opens_block(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!ReasoningParser::prompt_opens_block(
            "<|im_start|>assistant\n"
        ));
    }

    #[test]
    fn unclosed_block_is_reasoning() {
        assert_eq!(
            run(false, &["<think>", "still thinking </thi"]),
            ("still thinking </thi".into(), String::new())
        );
    }

    #[test]
    fn long_leading_whitespace_is_content() {
        let ws = " ".repeat(100);
        let (r, c) = run(false, &[&ws, "<think>x</think>y"]);
        assert_eq!(r, "");
        assert_eq!(c, format!("{ws}<think>x</think>y"));
    }
}
