//! A sequence as the scheduler sees it: its tokens, how many of them have their KV in the
//! cache, and its blocks. No tensors.

use super::block_manager::BlockTable;

pub type SeqId = u64;

#[derive(Debug)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt tokens followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose keys and values are in the cache.
    pub num_computed: usize,
    pub block_table: BlockTable,
    /// False when every prompt token must be computed (prompt logprobs need their logits).
    pub use_prefix_cache: bool,
    /// Whether its prompt chunks need the logits of every row (prompt logprobs): the scheduler
    /// bounds those rows per step ([`super::scheduler::FULL_LOGIT_ROWS_PER_STEP`]).
    pub full_logits: bool,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            block_table: BlockTable::default(),
            use_prefix_cache: true,
            full_logits: false,
        }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Tokens still to be run through the model.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Whether the next chunk is (partly) prompt whose every row needs logits.
    pub fn needs_full_logits(&self) -> bool {
        self.full_logits && self.num_computed < self.prompt_len
    }

    /// The tokens and the block table at once (the block manager reads one and updates the other).
    pub fn tokens_and_table(&mut self) -> (&[u32], &mut BlockTable) {
        (&self.tokens, &mut self.block_table)
    }

    pub fn push_token(&mut self, token: u32) {
        self.tokens.push(token);
    }
}
