//! Structured output: a request's grammar (a JSON schema, a regex, a choice, a Lark grammar)
//! compiled by llguidance against the model's vocabulary, and per sequence a matcher that
//! says which tokens may come next. One token trie per loaded tokenizer, built once from the
//! byte-level table the detokenizer already has (no second tokenizers crate); one compiled
//! grammar per request, deep-cloned for each of its `n` completions.

use std::sync::Arc;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value as Json};

use super::detokenizer::TokenBytes;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema (`response_format` json_schema, `structured_outputs.json`).
    JsonSchema(Json),
    /// Any JSON object (`response_format` json_object).
    JsonObject,
    /// A regular expression the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect (it may embed `%json {...}` schemas).
    Lark(String),
}

/// Whitespace JSON may hold between two tokens: any, as JSON allows, but at most this run,
/// so that a model cannot fill `max_tokens` with blanks inside an object (pretty-printing
/// six levels deep still fits).
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,32}";

/// Why a grammar was refused, for the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// Compiles grammars against one tokenizer's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// The token trie of `table` over the model's `vocab_size` logits (ids past the tokenizer
    /// have no bytes and are never allowed); special tokens are marked as llguidance expects.
    pub fn new(
        table: &TokenBytes,
        vocab_size: usize,
        eos_token_ids: &[u32],
    ) -> Result<Self, GrammarError> {
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match table.token(id) {
                Some((bytes, true)) => [&[TokTrie::SPECIAL_TOKEN_MARKER], bytes].concat(),
                Some((bytes, false)) => bytes.to_vec(),
                None => Vec::new(),
            })
            .collect();
        let eos: Vec<u32> = eos_token_ids
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        let Some(&first_eos) = eos.first() else {
            return Err(GrammarError(
                "structured output needs an end-of-sequence token in the vocabulary".into(),
            ));
        };
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| GrammarError(format!("building the token trie: {e}")))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // Errors name the cause, not the grammar and the parser state.
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self { factory })
    }

    /// Compiles `spec`. Bounded in time by llguidance's fuel limits (the lexer's initial
    /// fuel, the grammar's size): a hostile grammar fails here, with the reason.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, GrammarError> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_json_options(schema.clone()))
            }
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(with_json_options(json!({"type": "object"})))
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError("the choice list is empty".into()));
                }
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| format!("(?:{})", regex_syntax::escape(c)))
                    .collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            GrammarSpec::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError(e));
        }
        Ok(Grammar(Arc::new(matcher)))
    }
}

/// llguidance's JSON options for a schema that does not set its own (`x-guidance`).
pub fn with_json_options(mut schema: Json) -> Json {
    if let Json::Object(map) = &mut schema {
        map.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// A compiled grammar in its start state; each sequence matches with its own copy.
#[derive(Clone)]
pub struct Grammar(Arc<Matcher>);

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Where in the output the grammar applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintStart {
    /// From the first token. With `think` (the ids of `<think>` and `</think>`), the first
    /// token may open a think block instead, and the grammar applies after its end.
    Now { think: Option<(u32, u32)> },
    /// After this token (the prompt opened a think block: after `</think>`).
    After(u32),
    /// After each time this token comes, until the grammar completes, then free again (the
    /// arguments of tool calls the model opens by itself).
    EachAfter(u32),
}

/// A request's constraint: the grammar and where it applies.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidConstraint {
    pub grammar: Grammar,
    pub start: ConstraintStart,
}

enum Phase {
    /// The first token: the grammar's, or the think block's start.
    First(Matcher, (u32, u32)),
    /// Unconstrained until this token.
    Waiting(u32),
    Active(Matcher),
}

/// One sequence's matcher.
pub struct SeqConstraint {
    grammar: Grammar,
    start: ConstraintStart,
    phase: Phase,
    /// Tokens that end the sequence: allowed exactly when the grammar may end.
    end_tokens: Vec<u32>,
}

impl SeqConstraint {
    pub fn new(c: &ValidConstraint, end_tokens: Vec<u32>) -> Self {
        let fresh = || c.grammar.0.deep_clone();
        let phase = match c.start {
            ConstraintStart::Now { think: Some(ids) } => Phase::First(fresh(), ids),
            ConstraintStart::Now { think: None } => Phase::Active(fresh()),
            ConstraintStart::After(t) | ConstraintStart::EachAfter(t) => Phase::Waiting(t),
        };
        Self {
            grammar: c.grammar.clone(),
            start: c.start,
            phase,
            end_tokens,
        }
    }

    /// Whether the next token is constrained (a mask is needed).
    pub fn is_active(&self) -> bool {
        !matches!(self.phase, Phase::Waiting(_))
    }

    /// The grammar is complete and allows nothing more: only an end token may follow.
    pub fn is_complete(&self) -> bool {
        match &self.phase {
            Phase::Active(m) => m.is_stopped() && !m.is_error(),
            _ => false,
        }
    }

    pub fn has_end_tokens(&self) -> bool {
        !self.end_tokens.is_empty()
    }

    /// The tokens allowed next (None when unconstrained). Costs up to a few hundred µs: the
    /// engine computes it on a worker thread while the forward pass runs.
    pub fn compute_mask(&mut self) -> Option<Result<SimpleVob, GrammarError>> {
        let (matcher, think_start) = match &mut self.phase {
            Phase::Waiting(_) => return None,
            Phase::First(m, (start, _)) => (m, Some(*start)),
            Phase::Active(m) => (m, None),
        };
        let mut mask = match matcher.compute_mask_or_eos() {
            Ok(mask) => mask,
            Err(e) => return Some(Err(GrammarError(e.to_string()))),
        };
        let may_end = self
            .end_tokens
            .iter()
            .any(|&t| (t as usize) < mask.len() && mask.is_allowed(t));
        for &t in &self.end_tokens {
            if (t as usize) < mask.len() {
                mask.set(t as usize, may_end);
            }
        }
        if let Some(t) = think_start.filter(|&t| (t as usize) < mask.len()) {
            mask.allow_token(t);
        }
        Some(Ok(mask))
    }

    /// Advances past a generated token (not an end token: the sequence ends there). An error
    /// (a token the grammar refuses) leaves the sequence to fail.
    pub fn on_token(&mut self, token: u32) -> Result<(), GrammarError> {
        let phase = std::mem::replace(&mut self.phase, Phase::Waiting(u32::MAX));
        self.phase = match phase {
            Phase::First(_, (start, end)) if token == start => Phase::Waiting(end),
            Phase::First(mut m, _) | Phase::Active(mut m) => {
                m.consume_token(token)
                    .map_err(|e| GrammarError(e.to_string()))?;
                match self.start {
                    ConstraintStart::EachAfter(t) if m.is_stopped() => Phase::Waiting(t),
                    _ => Phase::Active(m),
                }
            }
            Phase::Waiting(t) if token == t => Phase::Active(self.grammar.0.deep_clone()),
            waiting @ Phase::Waiting(_) => waiting,
        };
        Ok(())
    }
}

/// Sets every logit the mask does not allow to -inf (a word of the bit set at a time: a
/// vocabulary of 152k is 4.7k words, most all-set or all-clear).
pub fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (i, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << i) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}
