//! Counters the engine keeps, read through `EngineHandle::stats` (the metrics endpoint later).

use super::request::FinishReason;
use super::scheduler::Scheduler;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_blocks: usize,
    pub num_free_blocks: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    pub prefix_caching: bool,
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub num_preemptions: u64,
    pub num_aborted: u64,
    pub num_generated_tokens: u64,
    /// Prompt tokens of requests whose prompt has been processed.
    pub num_prompt_tokens: u64,
    pub num_finished_stop: u64,
    pub num_finished_length: u64,
    pub num_finished_error: u64,
    /// Grammar masks computed (structured output), and their time on the worker thread.
    pub num_grammar_masks: u64,
    pub grammar_mask_seconds: f64,
    /// Time the engine thread waited for masks after its forward pass was done (or computed
    /// them itself): what structured output adds to a step.
    pub grammar_wait_seconds: f64,
}

impl EngineStats {
    pub(crate) fn record_finish(&mut self, reason: FinishReason) {
        match reason {
            FinishReason::Stop => self.num_finished_stop += 1,
            FinishReason::Length => self.num_finished_length += 1,
            FinishReason::Error => self.num_finished_error += 1,
        }
    }

    pub(crate) fn fill_from(&mut self, scheduler: &Scheduler) {
        let blocks = scheduler.blocks();
        let prefix = blocks.prefix_cache_stats();
        self.num_running = scheduler.num_running();
        self.num_waiting = scheduler.num_waiting();
        self.num_blocks = blocks.num_blocks();
        self.block_size = blocks.block_size();
        self.prefix_caching = scheduler.prefix_caching();
        self.num_free_blocks = blocks.num_free_blocks();
        self.prefix_cache_queried_tokens = prefix.queried_tokens;
        self.prefix_cache_hit_tokens = prefix.hit_tokens;
    }
}
