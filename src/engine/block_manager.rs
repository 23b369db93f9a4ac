//! Paged KV-cache bookkeeping: fixed-size blocks with reference counts, and automatic prefix
//! caching. Plain data, no tensors.
//!
//! A full block is keyed by a SHA-256 hash of its parent block's hash and its own token ids, so
//! equal keys mean equal prefixes (up to SHA-256 collisions). Blocks whose reference count drops
//! to zero keep their key and go to the back of the free list; allocation takes from the front,
//! evicting the least recently freed cached block first. A sequence's blocks are freed tail
//! first, so its prefix outlives its suffix.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

pub type BlockId = u32;

/// Content key of a full block, chained with its parent's.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash([u8; 32]);

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl BlockHash {
    pub fn chain(parent: Option<&BlockHash>, tokens: &[u32]) -> Self {
        let mut h = Sha256::new();
        match parent {
            Some(p) => {
                h.update([1u8]);
                h.update(p.0);
            }
            None => h.update([0u8]),
        }
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        Self(h.finalize().into())
    }
}

/// The blocks of one sequence, in order, and the keys of its leading full blocks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up in the prefix cache.
    pub queried_tokens: u64,
    /// Of those, tokens found cached.
    pub hit_tokens: u64,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    ref_count: u32,
    hash: Option<BlockHash>,
}

const NIL: u32 = u32::MAX;

/// Doubly linked list over block ids (the free list), O(1) push-back, pop-front and removal.
#[derive(Debug)]
struct LruList {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl LruList {
    fn full(n: usize) -> Self {
        let mut list = Self {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            linked: vec![false; n],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for id in 0..n as u32 {
            list.push_back(id);
        }
        list
    }

    fn push_back(&mut self, id: u32) {
        let i = id as usize;
        debug_assert!(!self.linked[i]);
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.linked[i] = true;
        self.len += 1;
    }

    fn remove(&mut self, id: u32) {
        let i = id as usize;
        debug_assert!(self.linked[i]);
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.linked[i] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.remove(id);
        Some(id)
    }
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    free: LruList,
    cached: HashMap<BlockHash, BlockId>,
    stats: PrefixCacheStats,
}

/// A prefix-cache lookup: cached blocks for the leading full blocks of a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixHit {
    blocks: Vec<BlockId>,
    hashes: Vec<BlockHash>,
}

impl PrefixHit {
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0 && num_blocks < NIL as usize);
        Self {
            block_size,
            blocks: vec![
                Block {
                    ref_count: 0,
                    hash: None
                };
                num_blocks
            ],
            free: LruList::full(num_blocks),
            cached: HashMap::new(),
            stats: PrefixCacheStats {
                queried_tokens: 0,
                hit_tokens: 0,
            },
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks not referenced by any sequence (cached ones included: they can be evicted).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len
    }

    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.stats
    }

    fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The longest run of cached full blocks at the start of `tokens`, leaving at least one token
    /// uncached (its logits are needed).
    pub fn lookup_prefix(&self, tokens: &[u32]) -> PrefixHit {
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut hit = PrefixHit {
            blocks: Vec::new(),
            hashes: Vec::new(),
        };
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = BlockHash::chain(hit.hashes.last(), chunk);
            match self.cached.get(&hash) {
                Some(&id) => {
                    hit.blocks.push(id);
                    hit.hashes.push(hash);
                }
                None => break,
            }
        }
        hit
    }

    /// Whether `table` (after taking `hit`, if any) can grow to hold `num_tokens` tokens.
    pub fn can_allocate(
        &self,
        table: &BlockTable,
        hit: Option<&PrefixHit>,
        num_tokens: usize,
    ) -> bool {
        let have = table.blocks.len() + hit.map_or(0, |h| h.blocks.len());
        let need = self.blocks_for(num_tokens).saturating_sub(have);
        // Cached hits sitting in the free list stop being free once taken.
        let hits_from_free = hit.map_or(0, |h| {
            h.blocks
                .iter()
                .filter(|&&b| self.blocks[b as usize].ref_count == 0)
                .count()
        });
        need + hits_from_free <= self.free.len
    }

    /// Takes the blocks of a prefix hit for a prompt of `num_prompt_tokens` into an empty table,
    /// and counts the lookup in the prefix-cache stats.
    pub fn take_prefix(
        &mut self,
        table: &mut BlockTable,
        hit: PrefixHit,
        num_prompt_tokens: usize,
    ) {
        debug_assert!(table.blocks.is_empty());
        self.stats.queried_tokens += num_prompt_tokens as u64;
        self.stats.hit_tokens += (hit.blocks.len() * self.block_size) as u64;
        for &id in &hit.blocks {
            let block = &mut self.blocks[id as usize];
            if block.ref_count == 0 {
                self.free.remove(id);
            }
            block.ref_count += 1;
        }
        table.blocks = hit.blocks;
        table.hashes = hit.hashes;
    }

    /// Grows `table` to hold `num_tokens` tokens. Returns false, changing nothing, when there are
    /// not enough free blocks.
    pub fn allocate(&mut self, table: &mut BlockTable, num_tokens: usize) -> bool {
        if !self.can_allocate(table, None, num_tokens) {
            return false;
        }
        while table.blocks.len() < self.blocks_for(num_tokens) {
            let Some(id) = self.free.pop_front() else {
                return false; // unreachable after can_allocate
            };
            let block = &mut self.blocks[id as usize];
            if let Some(hash) = block.hash.take() {
                // Evict: this cached block is reused for new content.
                if self.cached.get(&hash) == Some(&id) {
                    self.cached.remove(&hash);
                }
            }
            block.ref_count = 1;
            table.blocks.push(id);
        }
        true
    }

    /// Registers the full blocks among the first `num_computed` tokens of `tokens` (whose KV is
    /// now in the cache) so that later prompts can share them.
    pub fn cache_full_blocks(
        &mut self,
        table: &mut BlockTable,
        tokens: &[u32],
        num_computed: usize,
    ) {
        let num_full = (num_computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        while table.hashes.len() < num_full {
            let i = table.hashes.len();
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = BlockHash::chain(table.hashes.last(), chunk);
            let id = table.blocks[i];
            let block = &mut self.blocks[id as usize];
            if block.hash.is_none() {
                // Keep the first block registered for a key; a duplicate stays private.
                if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
                    e.insert(id);
                    block.hash = Some(hash);
                }
            }
            table.hashes.push(hash);
        }
    }

    /// Releases a sequence's blocks, tail first, and empties the table.
    pub fn free(&mut self, table: &mut BlockTable) {
        for &id in table.blocks.iter().rev() {
            let block = &mut self.blocks[id as usize];
            debug_assert!(
                block.ref_count > 0,
                "block {id} freed more often than taken"
            );
            block.ref_count = block.ref_count.saturating_sub(1);
            if block.ref_count == 0 {
                self.free.push_back(id);
            }
        }
        table.blocks.clear();
        table.hashes.clear();
    }

    /// Checks the internal invariants; for tests.
    pub fn check_invariants(&self, tables: &[&BlockTable]) -> Result<(), String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for t in tables {
            for &b in &t.blocks {
                refs[b as usize] += 1;
            }
        }
        for (id, block) in self.blocks.iter().enumerate() {
            if block.ref_count != refs[id] {
                return Err(format!(
                    "block {id}: ref_count {} but {} tables hold it",
                    block.ref_count, refs[id]
                ));
            }
            if (block.ref_count == 0) != self.free.linked[id] {
                return Err(format!(
                    "block {id}: ref_count {} but free-list membership {}",
                    block.ref_count, self.free.linked[id]
                ));
            }
            if let Some(h) = block.hash {
                if self.cached.get(&h) != Some(&(id as u32)) {
                    return Err(format!("block {id}: hash not registered to it"));
                }
            }
        }
        for (h, &id) in &self.cached {
            if self.blocks[id as usize].hash != Some(*h) {
                return Err(format!("cache entry for block {id} is stale"));
            }
        }
        let mut n = 0;
        let mut cur = self.free.head;
        while cur != NIL {
            n += 1;
            cur = self.free.next[cur as usize];
        }
        if n != self.free.len {
            return Err(format!("free list has {n} links but len {}", self.free.len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn allocates_whole_blocks_and_frees_them() {
        let mut bm = BlockManager::new(8, 4);
        let mut t = BlockTable::default();
        assert!(bm.allocate(&mut t, 5));
        assert_eq!(t.blocks().len(), 2);
        assert_eq!(bm.num_free_blocks(), 6);
        assert!(bm.allocate(&mut t, 8)); // still two blocks
        assert_eq!(t.blocks().len(), 2);
        assert!(!bm.allocate(&mut t, 8 * 4 + 1), "more than exists");
        assert_eq!(t.blocks().len(), 2, "a failed allocation changes nothing");
        bm.check_invariants(&[&t]).unwrap();
        bm.free(&mut t);
        assert!(t.is_empty());
        assert_eq!(bm.num_free_blocks(), 8);
        bm.check_invariants(&[]).unwrap();
    }

    #[test]
    fn shared_prefix_hits_and_refcounts() {
        let mut bm = BlockManager::new(16, 4);
        let prompt = tokens(10, 1);
        let mut a = BlockTable::default();
        assert_eq!(bm.lookup_prefix(&prompt).num_blocks(), 0);
        assert!(bm.allocate(&mut a, prompt.len()));
        bm.cache_full_blocks(&mut a, &prompt, prompt.len());
        // Same first 8 tokens, different tail: two full blocks hit.
        let mut other = prompt[..8].to_vec();
        other.extend([999, 998, 997]);
        let hit = bm.lookup_prefix(&other);
        assert_eq!(hit.num_blocks(), 2);
        let mut b = BlockTable::default();
        assert!(bm.can_allocate(&b, Some(&hit), other.len()));
        bm.take_prefix(&mut b, hit, other.len());
        assert!(bm.allocate(&mut b, other.len()));
        assert_eq!(&a.blocks()[..2], &b.blocks()[..2]);
        assert_ne!(a.blocks()[2], b.blocks()[2]);
        bm.check_invariants(&[&a, &b]).unwrap();
        bm.free(&mut a);
        bm.check_invariants(&[&b]).unwrap();
        bm.free(&mut b);
        assert_eq!(bm.num_free_blocks(), 16);
        // Freed blocks keep their keys: a third request still hits.
        assert_eq!(bm.lookup_prefix(&other).num_blocks(), 2);
        let stats = bm.prefix_cache_stats();
        assert_eq!(stats.hit_tokens, 8);
        assert_eq!(stats.queried_tokens, 11);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_token() {
        let mut bm = BlockManager::new(8, 4);
        let prompt = tokens(8, 3);
        let mut a = BlockTable::default();
        assert!(bm.allocate(&mut a, 8));
        bm.cache_full_blocks(&mut a, &prompt, 8);
        assert_eq!(
            bm.lookup_prefix(&prompt).num_blocks(),
            1,
            "the last block holds the token to compute"
        );
    }

    #[test]
    fn hashes_chain_on_the_parent() {
        let mut bm = BlockManager::new(8, 2);
        let mut a = BlockTable::default();
        let first = vec![1, 2, 3, 4, 0];
        assert!(bm.allocate(&mut a, 5));
        bm.cache_full_blocks(&mut a, &first, 5);
        // Second block's tokens equal, first block's differ: no hit at all.
        assert_eq!(bm.lookup_prefix(&[9, 9, 3, 4, 0]).num_blocks(), 0);
        assert_eq!(bm.lookup_prefix(&[1, 2, 3, 4, 0]).num_blocks(), 2);
    }

    #[test]
    fn eviction_is_least_recently_freed_first_and_tail_first() {
        let mut bm = BlockManager::new(4, 2);
        let p = vec![1, 2, 3, 4, 5];
        let mut a = BlockTable::default();
        assert!(bm.allocate(&mut a, 4));
        bm.cache_full_blocks(&mut a, &p, 4);
        bm.free(&mut a); // p's blocks: free, cached
        let mut b = BlockTable::default();
        assert!(bm.allocate(&mut b, 2)); // takes a never-used block first
        assert_eq!(bm.lookup_prefix(&p).num_blocks(), 2, "p is still cached");
        let mut c = BlockTable::default();
        // The last never-used block, then one of p's: its tail goes first.
        assert!(bm.allocate(&mut c, 4));
        assert_eq!(
            bm.lookup_prefix(&p).num_blocks(),
            1,
            "p's first block survives"
        );
        bm.check_invariants(&[&b, &c]).unwrap();
    }

    #[test]
    fn taking_a_free_cached_block_counts_against_free_space() {
        let mut bm = BlockManager::new(2, 2);
        let p = vec![1, 2, 3];
        let mut a = BlockTable::default();
        assert!(bm.allocate(&mut a, 3));
        bm.cache_full_blocks(&mut a, &p, 3);
        bm.free(&mut a);
        let hit = bm.lookup_prefix(&[1, 2, 3, 4, 5]);
        assert_eq!(hit.num_blocks(), 1);
        let t = BlockTable::default();
        assert!(bm.can_allocate(&t, Some(&hit), 4));
        assert!(
            !bm.can_allocate(&t, Some(&hit), 5),
            "hit (1 free block) + 2 new > 2"
        );
    }
}
