//! Continuous batching with chunked prefill, prefix caching and preemption by recompute.
//! Plain data: it decides which tokens of which sequences run in the next step.
//!
//! Each step: running sequences first, in admission order, each taking what it still needs
//! (one token when decoding, the rest of its prompt when prefilling) up to the token budget.
//! When blocks run out, the newest running sequence is preempted: its blocks are freed and it
//! goes back to the front of the queue, to be recomputed later (its cached prefix usually
//! survives in the prefix cache). Then, if nothing was preempted, waiting sequences are admitted
//! in arrival order while budget, sequence slots and blocks last, skipping their cached prefix.
//! Prompt chunks that need every row's logits (prompt logprobs: rows × vocabulary floats on the
//! host) share a smaller budget of [`FULL_LOGIT_ROWS_PER_STEP`] rows.

use std::collections::VecDeque;

use super::block_manager::BlockManager;
use super::sequence::{SeqId, Sequence};

/// Rows of full-vocabulary logits one step may produce for prompt logprobs (64 rows of a
/// 152k vocabulary are 39 MB of f32): longer prompts that want them run in more, smaller
/// chunks.
pub const FULL_LOGIT_ROWS_PER_STEP: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Token budget of one step (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
}

/// One sequence's share of a step: tokens `start_pos..start_pos + num_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    pub start_pos: usize,
    pub num_tokens: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences sent back to the queue in this step.
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_tokens).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        assert!(cfg.max_num_batched_tokens > 0 && cfg.max_num_seqs > 0);
        Self {
            cfg,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    pub fn prefix_caching(&self) -> bool {
        self.cfg.enable_prefix_caching
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Whether a sequence that may grow to `max_len` tokens fits in the whole cache; longer ones
    /// must be refused before `add`, or they would wait forever.
    pub fn can_ever_fit(&self, max_len: usize) -> bool {
        max_len <= self.blocks.num_blocks() * self.blocks.block_size()
    }

    pub fn add(&mut self, seq: Sequence) {
        debug_assert!(!seq.is_empty() && seq.block_table.is_empty());
        self.waiting.push_back(seq);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.running
            .iter()
            .find(|s| s.id == id)
            .or_else(|| self.waiting.iter().find(|s| s.id == id))
    }

    fn running_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.running.iter_mut().find(|s| s.id == id)
    }

    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut rows_budget = FULL_LOGIT_ROWS_PER_STEP;
        let mut out = SchedulerOutput::default();
        // A chunk's tokens, within both budgets.
        let chunk = |seq: &Sequence, wanted: usize, budget: usize, rows_budget: usize| {
            let n = wanted.min(budget);
            if seq.needs_full_logits() {
                n.min(rows_budget)
            } else {
                n
            }
        };

        // 1. Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = chunk(seq, seq.num_uncomputed(), budget, rows_budget);
            if n == 0 {
                i += 1;
                continue;
            }
            loop {
                let seq = &mut self.running[i];
                let target = seq.num_computed + n;
                if self.blocks.allocate(&mut seq.block_table, target) {
                    out.seqs.push(ScheduledSeq {
                        id: seq.id,
                        start_pos: seq.num_computed,
                        num_tokens: n,
                    });
                    budget -= n;
                    if seq.needs_full_logits() {
                        rows_budget -= n;
                    }
                    i += 1;
                    break;
                }
                // Out of blocks: preempt the newest running sequence (possibly this one).
                let Some(mut victim) = self.running.pop() else {
                    break;
                };
                let was_current = self.running.len() == i;
                self.blocks.free(&mut victim.block_table);
                victim.num_computed = 0;
                out.preempted.push(victim.id);
                self.num_preemptions += 1;
                self.waiting.push_front(victim);
                if was_current {
                    break;
                }
            }
        }
        // Preempted sequences went to the front in reverse order; restore their relative order.
        if out.preempted.len() > 1 {
            let k = out.preempted.len();
            self.waiting.make_contiguous()[..k].reverse();
        }

        // 2. Waiting sequences, in order, unless this step had to preempt.
        while out.preempted.is_empty() && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let hit = (self.cfg.enable_prefix_caching && seq.use_prefix_cache)
                .then(|| self.blocks.lookup_prefix(seq.tokens()));
            let cached = hit
                .as_ref()
                .map_or(0, |h| h.num_blocks() * self.blocks.block_size());
            let n = chunk(seq, seq.len() - cached, budget, rows_budget);
            if n == 0 {
                break; // its rows wait for the next step; later arrivals wait behind it
            }
            if !self
                .blocks
                .can_allocate(&seq.block_table, hit.as_ref(), cached + n)
            {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if let Some(hit) = hit {
                let len = seq.len();
                self.blocks.take_prefix(&mut seq.block_table, hit, len);
            }
            if !self.blocks.allocate(&mut seq.block_table, cached + n) {
                // Unreachable after can_allocate; give the blocks back and stop admitting.
                self.blocks.free(&mut seq.block_table);
                self.waiting.push_front(seq);
                break;
            }
            seq.num_computed = cached;
            out.seqs.push(ScheduledSeq {
                id: seq.id,
                start_pos: cached,
                num_tokens: n,
            });
            budget -= n;
            if seq.needs_full_logits() {
                rows_budget -= n;
            }
            self.running.push(seq);
        }
        out
    }

    /// Records that the model ran `out`. Returns the sequences whose every token is now computed:
    /// the logits of their last token give their next token.
    pub fn on_step_done(&mut self, out: &SchedulerOutput) -> Vec<SeqId> {
        let caching = self.cfg.enable_prefix_caching;
        let mut ready = Vec::with_capacity(out.seqs.len());
        for s in &out.seqs {
            let Some(idx) = self.running.iter().position(|q| q.id == s.id) else {
                continue; // finished or aborted meanwhile
            };
            let seq = &mut self.running[idx];
            seq.num_computed = (s.start_pos + s.num_tokens).min(seq.len());
            if caching {
                let num_computed = seq.num_computed;
                let (tokens, table) = seq.tokens_and_table();
                self.blocks.cache_full_blocks(table, tokens, num_computed);
            }
            if seq.num_computed == seq.len() {
                ready.push(s.id);
            }
        }
        ready
    }

    /// Stops bounding a sequence's prompt chunks for full logits (its prompt logprobs are sent;
    /// a recompute after preemption needs only the last row).
    pub fn clear_full_logits(&mut self, id: SeqId) {
        if let Some(seq) = self.running_mut(id) {
            seq.full_logits = false;
        }
    }

    /// Appends a sampled token to a running sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) -> bool {
        match self.running_mut(id) {
            Some(seq) => {
                seq.push_token(token);
                true
            }
            None => false,
        }
    }

    /// Removes a sequence (finished or aborted), wherever it is, and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.blocks.free(&mut seq.block_table);
        Some(seq)
    }

    /// Checks block accounting against every sequence's table; for tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(s) = self.waiting.iter().find(|s| !s.block_table.is_empty()) {
            return Err(format!("waiting sequence {} holds blocks", s.id));
        }
        if self.running.len() > self.cfg.max_num_seqs {
            return Err(format!("{} running > max_num_seqs", self.running.len()));
        }
        let tables: Vec<_> = self.running.iter().map(|s| &s.block_table).collect();
        self.blocks.check_invariants(&tables)
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
