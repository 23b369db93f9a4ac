use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn scheduler(num_blocks: usize, block_size: usize, budget: usize, max_seqs: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: max_seqs,
            enable_prefix_caching: true,
        },
        BlockManager::new(num_blocks, block_size),
    )
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(31).wrapping_add(salt))
        .collect()
}

fn sched(id: SeqId, start_pos: usize, num_tokens: usize) -> ScheduledSeq {
    ScheduledSeq {
        id,
        start_pos,
        num_tokens,
    }
}

/// Runs one step as the engine would: every sequence whose tokens are all computed gets `token`.
fn step(s: &mut Scheduler, token: u32) -> SchedulerOutput {
    let out = s.schedule();
    for id in s.on_step_done(&out) {
        assert!(s.append_token(id, token));
    }
    s.check_invariants().unwrap();
    out
}

/// Prompt chunks that need every row's logits share FULL_LOGIT_ROWS_PER_STEP rows per step;
/// other sequences fill the rest of the token budget, and decoding is not bounded by it.
#[test]
fn full_logit_rows_are_bounded_per_step() {
    let rows = FULL_LOGIT_ROWS_PER_STEP;
    let mut s = scheduler(256, 16, 4 * rows, 8);
    for id in [1, 2] {
        let mut seq = Sequence::new(id, prompt(rows + rows / 2, id as u32));
        seq.use_prefix_cache = false;
        seq.full_logits = true;
        s.add(seq);
    }
    s.add(Sequence::new(3, prompt(rows, 9)));
    // 1 takes the whole row budget; 2 waits for rows and 3 waits behind it (arrival order).
    assert_eq!(step(&mut s, 5).seqs, vec![sched(1, 0, rows)]);
    // 1's rest, then 2 gets the rows that remain, and 3 (no full logits) the tokens after.
    assert_eq!(
        step(&mut s, 5).seqs,
        vec![
            sched(1, rows, rows / 2),
            sched(2, 0, rows / 2),
            sched(3, 0, rows)
        ]
    );
    // Decode tokens are not bounded by the rows (1 is past its prompt; 3 wants no rows).
    s.clear_full_logits(1);
    assert_eq!(
        step(&mut s, 5).seqs,
        vec![
            sched(1, rows + rows / 2, 1),
            sched(2, rows / 2, rows),
            sched(3, rows, 1)
        ]
    );
}

#[test]
fn long_prompts_are_prefilled_in_chunks_within_the_budget() {
    let mut s = scheduler(64, 4, 8, 4);
    s.add(Sequence::new(1, prompt(20, 0)));
    assert_eq!(step(&mut s, 5).seqs, vec![sched(1, 0, 8)]);
    assert_eq!(step(&mut s, 5).seqs, vec![sched(1, 8, 8)]);
    assert_eq!(
        s.get(1).unwrap().output(),
        &[] as &[u32],
        "no token before the prompt is done"
    );
    assert_eq!(step(&mut s, 5).seqs, vec![sched(1, 16, 4)]);
    assert_eq!(s.get(1).unwrap().output(), &[5]);
    assert_eq!(
        step(&mut s, 6).seqs,
        vec![sched(1, 20, 1)],
        "then one decode token per step"
    );
}

#[test]
fn decodes_go_first_and_prefill_fills_the_rest_of_the_budget() {
    let mut s = scheduler(64, 4, 6, 4);
    s.add(Sequence::new(1, prompt(3, 0)));
    step(&mut s, 9);
    s.add(Sequence::new(2, prompt(10, 1)));
    assert_eq!(step(&mut s, 9).seqs, vec![sched(1, 3, 1), sched(2, 0, 5)]);
    assert_eq!(step(&mut s, 9).seqs, vec![sched(1, 4, 1), sched(2, 5, 5)]);
}

#[test]
fn max_num_seqs_caps_admission() {
    let mut s = scheduler(64, 4, 100, 2);
    for id in 1..=3 {
        s.add(Sequence::new(id, prompt(4, id as u32)));
    }
    let out = step(&mut s, 1);
    assert_eq!(
        out.seqs.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    s.remove(1);
    assert_eq!(step(&mut s, 1).seqs, vec![sched(2, 4, 1), sched(3, 0, 4)]);
}

#[test]
fn a_shared_prefix_is_not_recomputed() {
    let mut s = scheduler(64, 16, 512, 8);
    let shared = prompt(64, 7);
    s.add(Sequence::new(1, shared.clone()));
    step(&mut s, 0);
    let mut second = shared.clone();
    second.extend([1, 2, 3, 4, 5]);
    s.add(Sequence::new(2, second));
    assert_eq!(
        step(&mut s, 0).seqs,
        vec![sched(1, 64, 1), sched(2, 64, 5)],
        "only the suffix runs"
    );
    // A prompt equal to a cached one recomputes its last block, whose last token gives logits.
    s.add(Sequence::new(3, shared));
    assert_eq!(step(&mut s, 0).seqs.last(), Some(&sched(3, 48, 16)));
    let stats = s.blocks().prefix_cache_stats();
    assert_eq!(stats.hit_tokens, 64 + 48);
}

#[test]
fn preempts_the_newest_and_resumes_it_with_its_tokens() {
    // 4 blocks of 4 tokens.
    let mut s = scheduler(4, 4, 64, 4);
    s.add(Sequence::new(1, prompt(6, 1)));
    s.add(Sequence::new(2, prompt(6, 2)));
    step(&mut s, 10); // both prefilled: 2 blocks each; 7 tokens each now
    step(&mut s, 11); // position 6 computed; 8 tokens
    assert!(step(&mut s, 12).preempted.is_empty()); // position 7: blocks full; 9 tokens
    let out = step(&mut s, 13); // position 8 needs a third block: 2 (newest) is preempted
    assert_eq!(out.preempted, vec![2]);
    assert_eq!(out.seqs, vec![sched(1, 8, 1)]);
    assert_eq!(s.num_preemptions(), 1);
    assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
    let before = s.get(2).unwrap().tokens().to_vec();
    assert_eq!(before.len(), 9, "preemption keeps the generated tokens");
    s.remove(1);
    // 2 is recomputed. Its second block went to 1 (freed tail first, reused first); its first
    // block is still in the prefix cache.
    let out = step(&mut s, 14);
    assert_eq!(out.seqs, vec![sched(2, 4, 5)]);
    let seq = s.get(2).unwrap();
    assert_eq!(&seq.tokens()[..9], &before[..]);
    assert_eq!(seq.output(), &[10, 11, 12, 14]);
}

#[test]
fn removing_frees_blocks_whether_running_or_waiting() {
    let mut s = scheduler(8, 4, 64, 1);
    s.add(Sequence::new(1, prompt(10, 0)));
    s.add(Sequence::new(2, prompt(10, 1)));
    step(&mut s, 0);
    assert_eq!(s.blocks().num_free_blocks(), 5);
    assert!(s.remove(2).is_some(), "waiting");
    assert!(s.remove(1).is_some(), "running");
    assert!(s.remove(1).is_none(), "only once");
    assert_eq!(s.blocks().num_free_blocks(), 8);
    s.check_invariants().unwrap();
    assert!(!s.has_work());
}

/// 2,000+ random operations (arrivals with colliding prefixes, steps, aborts) on a small cache,
/// then a drain: invariants hold after every operation, every sequence is removed exactly once,
/// and every block ends free.
#[test]
fn random_operations_end_with_every_block_free() {
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (num_blocks, block_size, budget) = (24, 4, 16);
        let mut s = scheduler(num_blocks, block_size, budget, 6);
        let mut max_len = std::collections::HashMap::new();
        let (mut added, mut removed) = (BTreeSet::new(), BTreeSet::new());
        let mut next_id = 0;
        let finish = |s: &mut Scheduler, id: SeqId, removed: &mut BTreeSet<SeqId>| {
            assert!(s.remove(id).is_some());
            assert!(removed.insert(id), "sequence {id} removed twice");
        };
        let run_step = |s: &mut Scheduler,
                        rng: &mut StdRng,
                        removed: &mut BTreeSet<SeqId>,
                        max_len: &std::collections::HashMap<SeqId, usize>| {
            let out = s.schedule();
            assert!(out.num_tokens() <= budget);
            let ids: BTreeSet<_> = out.seqs.iter().map(|x| x.id).collect();
            assert_eq!(
                ids.len(),
                out.seqs.len(),
                "a sequence scheduled twice in a step"
            );
            for id in s.on_step_done(&out) {
                s.append_token(id, rng.random_range(0..3));
                if s.get(id).map(|q| q.len()) >= max_len.get(&id).copied() {
                    finish(s, id, removed);
                }
            }
            s.check_invariants().unwrap();
        };
        for _ in 0..2_000 {
            match rng.random_range(0..10) {
                0..=2 => {
                    // Prompts over a 3-token alphabet share prefixes often.
                    let len = rng.random_range(1..30);
                    let p: Vec<u32> = (0..len).map(|_| rng.random_range(0..2)).collect();
                    let total = len + rng.random_range(1..20);
                    if s.can_ever_fit(total) {
                        s.add(Sequence::new(next_id, p));
                        max_len.insert(next_id, total);
                        added.insert(next_id);
                        next_id += 1;
                    }
                }
                3 => {
                    let live: Vec<SeqId> = added.difference(&removed).copied().collect();
                    if !live.is_empty() {
                        let id = live[rng.random_range(0..live.len())];
                        finish(&mut s, id, &mut removed);
                        s.check_invariants().unwrap();
                    }
                }
                _ => run_step(&mut s, &mut rng, &mut removed, &max_len),
            }
        }
        let mut steps = 0;
        while s.has_work() {
            run_step(&mut s, &mut rng, &mut removed, &max_len);
            steps += 1;
            assert!(steps < 20_000, "seed {seed}: the queue does not drain");
        }
        assert_eq!(
            added, removed,
            "seed {seed}: every sequence finishes exactly once"
        );
        assert_eq!(s.blocks().num_free_blocks(), num_blocks, "seed {seed}");
        assert!(
            s.num_preemptions() > 0,
            "seed {seed}: the cache should be small enough to preempt"
        );
    }
}
