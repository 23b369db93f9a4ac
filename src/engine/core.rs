//! The engine loop. One OS thread owns the scheduler, the model, the KV cache and every
//! sequence's sampler and detokenizer; the rest of the program talks to it through channels.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use ember_models::{Batch, LogitsRows, PagedKvCache, QwenModel};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::detokenizer::{Detokenizer, TokenBytes};
use super::grammar::{GrammarError, SeqConstraint};
use super::request::{EngineEvent, FinishReason, StopReason, TokenLogprob, ValidRequest};
use super::sampler::{completion_seed, token_logprob, SampledToken, Sampler, SamplingParams};
use super::scheduler::{Scheduler, SchedulerOutput};
use super::sequence::{SeqId, Sequence};
use super::stats::EngineStats;
use super::Fault;
use llguidance::toktrie::SimpleVob;

pub(crate) enum Command {
    Submit {
        request: Arc<ValidRequest>,
        events: UnboundedSender<EngineEvent>,
    },
    Stats(std::sync::mpsc::Sender<EngineStats>),
}

/// Per-sequence state the scheduler does not need.
struct SeqState {
    request: Arc<ValidRequest>,
    /// Which of the request's `n` completions this is.
    index: usize,
    sampler: Sampler,
    /// Structured output: the matcher of this completion.
    constraint: Option<SeqConstraint>,
    detok: Detokenizer,
    events: UnboundedSender<EngineEvent>,
    /// Completions still to fork from this one when its prompt is done (n > 1).
    children_to_fork: usize,
    /// Whether this sequence computes and sends the prompt logprobs: the first completion
    /// only (the others are forked after them and share its cached prompt), until sent.
    wants_prompt_logprobs: bool,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    num_cached_tokens: Option<usize>,
    arrived: Instant,
    /// From arrival to the first scheduling.
    queue_time: Option<Duration>,
}

/// The test hooks of `EngineConfig`, resolved (library callers only).
#[derive(Default)]
pub(crate) struct TestHooks {
    /// Every completion is these tokens, then EOS.
    pub forced_output: Option<Vec<u32>>,
    /// A failure to inject.
    pub fault: Option<Fault>,
}

pub(crate) struct Engine {
    model: QwenModel,
    cache: PagedKvCache,
    scheduler: Scheduler,
    tokenizer: Arc<Tokenizer>,
    /// Byte-exact detokenization's table, where the tokenizer is byte-level.
    token_bytes: Option<Arc<TokenBytes>>,
    eos_token_ids: Vec<u32>,
    seqs: HashMap<SeqId, SeqState>,
    next_id: SeqId,
    stats: EngineStats,
    hooks: TestHooks,
    steps: u64,
    /// The counters as of the end of the last loop turn (see `EngineHandle::stats_snapshot`).
    published: Arc<Mutex<EngineStats>>,
}

impl Engine {
    pub(crate) fn new(
        model: QwenModel,
        cache: PagedKvCache,
        scheduler: Scheduler,
        tokenizer: Arc<Tokenizer>,
        eos_token_ids: Vec<u32>,
        hooks: TestHooks,
        published: Arc<Mutex<EngineStats>>,
    ) -> Self {
        Self {
            model,
            cache,
            scheduler,
            token_bytes: None,
            tokenizer,
            eos_token_ids,
            seqs: HashMap::new(),
            next_id: 0,
            stats: EngineStats::default(),
            hooks,
            steps: 0,
            published,
        }
    }

    /// Runs until every handle is dropped and no work is left.
    pub(crate) fn run(mut self, commands: Receiver<Command>) {
        // Built here, beside the server's start-up (~0.1 s for a 152k vocabulary).
        self.token_bytes = TokenBytes::new(&self.tokenizer).map(Arc::new);
        let mut connected = true;
        loop {
            // Block for work when idle; otherwise take what arrived and keep stepping.
            if !self.scheduler.has_work() {
                if !connected {
                    return;
                }
                match commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        connected = false;
                        break;
                    }
                }
            }
            self.abort_disconnected();
            if self.scheduler.has_work() {
                self.step();
            }
            self.publish_stats();
        }
    }

    /// Leaves a copy of the counters where `/metrics` reads them without asking this thread.
    fn publish_stats(&self) {
        let mut stats = self.stats.clone();
        stats.fill_from(&self.scheduler);
        if let Ok(mut shared) = self.published.lock() {
            *shared = stats;
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { request, events } => {
                let children = request.n.saturating_sub(1);
                self.add_sequence(request, events, 0, children, Instant::now());
            }
            Command::Stats(reply) => {
                let mut stats = self.stats.clone();
                stats.fill_from(&self.scheduler);
                let _ = reply.send(stats);
            }
        }
    }

    fn add_sequence(
        &mut self,
        request: Arc<ValidRequest>,
        events: UnboundedSender<EngineEvent>,
        index: usize,
        children: usize,
        arrived: Instant,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let mut params: SamplingParams = request.sampling.clone();
        // Each completion of a seeded request gets its own, reproducible stream.
        params.seed = params.seed.map(|s| completion_seed(s, index));
        let mut seq = Sequence::new(id, request.prompt.clone());
        let mut detok = Detokenizer::new(
            request.skip_special_tokens,
            request.stop.clone(),
            request.include_stop_str_in_output,
        );
        if let Some(table) = &self.token_bytes {
            detok = detok.exact(table.clone());
        }
        // Prompt logprobs need every prompt row's logits: no cached prefix may skip them.
        let wants_prompt_logprobs = request.prompt_logprobs.is_some() && index == 0;
        seq.use_prefix_cache = !wants_prompt_logprobs;
        seq.full_logits = wants_prompt_logprobs;
        let constraint = request.constraint.as_ref().map(|c| {
            let ends = self
                .eos_token_ids
                .iter()
                .filter(|_| !request.ignore_eos)
                .chain(&request.stop_token_ids)
                .copied()
                .collect();
            SeqConstraint::new(c, ends)
        });
        self.seqs.insert(
            id,
            SeqState {
                sampler: Sampler::new(params, &request.prompt),
                constraint,
                detok,
                index,
                events,
                children_to_fork: children,
                wants_prompt_logprobs,
                prompt_logprobs: Vec::new(),
                num_cached_tokens: None,
                arrived,
                queue_time: None,
                request,
            },
        );
        self.scheduler.add(seq);
    }

    /// A closed event channel means the client left: free its sequences now.
    fn abort_disconnected(&mut self) {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.scheduler.remove(id);
            self.seqs.remove(&id);
            self.stats.num_aborted += 1;
        }
    }

    fn step(&mut self) {
        self.steps += 1;
        if self.hooks.fault == Some(Fault::PanicAtStep(self.steps)) {
            panic!("injected fault: engine panic at step {}", self.steps);
        }
        let out = self.scheduler.schedule();
        self.stats.num_preemptions += out.preempted.len() as u64;
        if out.is_empty() {
            return;
        }
        // Prompt chunks of sequences that want prompt logprobs need every row's logits.
        let all_rows: Vec<bool> = out
            .seqs
            .iter()
            .map(|s| {
                let wants = self
                    .seqs
                    .get(&s.id)
                    .is_some_and(|st| st.wants_prompt_logprobs);
                wants && s.start_pos < prompt_len_of(&self.scheduler, s.id)
            })
            .collect();
        let (result, masks) = self.forward_and_masks(&out, &all_rows);
        match result {
            Ok(logits) => self.postprocess(&out, &all_rows, logits, masks),
            Err(e) => {
                tracing::error!("forward pass failed: {e}");
                for s in &out.seqs {
                    self.finish(s.id, FinishReason::Error, None);
                }
            }
        }
    }

    /// The forward pass, and meanwhile on a worker thread the grammar masks of the
    /// constrained sequences that sample this step: their cost hides under the model's
    /// instead of adding to every step of the batch.
    fn forward_and_masks(
        &mut self,
        out: &SchedulerOutput,
        all_rows: &[bool],
    ) -> (candle_core::Result<Vec<Vec<f32>>>, Masks) {
        let scheduler = &self.scheduler;
        // Sequences whose last scheduled token is their last one sample this step.
        let samples = |id: SeqId| {
            out.seqs.iter().any(|s| {
                s.id == id
                    && scheduler
                        .get(id)
                        .is_some_and(|q| s.start_pos + s.num_tokens >= q.tokens().len())
            })
        };
        // Constrained sequences first (a field check), so a batch without any pays nothing more.
        let mut constrained: Vec<(SeqId, &mut SeqConstraint)> = self
            .seqs
            .iter_mut()
            .filter_map(|(&id, st)| st.constraint.as_mut().map(|c| (id, c)))
            .filter(|(id, c)| c.is_active() && samples(*id))
            .collect();
        let (model, cache, stats) = (&self.model, &mut self.cache, &mut self.stats);
        if constrained.is_empty() {
            return (
                forward(scheduler, model, cache, out, all_rows),
                Masks::new(),
            );
        }
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("ember-grammar".into())
                .spawn_scoped(scope, move || {
                    let started = Instant::now();
                    let masks = constrained
                        .iter_mut()
                        .filter_map(|(id, c)| c.compute_mask().map(|m| (*id, m)))
                        .collect::<Masks>();
                    (masks, started.elapsed())
                });
            let result = forward(scheduler, model, cache, out, all_rows);
            let waited = Instant::now();
            // A worker that could not start or panicked leaves its sequences without a
            // mask: they fail rather than run unconstrained.
            let (masks, busy) = worker.ok().and_then(|w| w.join().ok()).unwrap_or_default();
            stats.num_grammar_masks += masks.len() as u64;
            stats.grammar_mask_seconds += busy.as_secs_f64();
            stats.grammar_wait_seconds += waited.elapsed().as_secs_f64();
            (result, masks)
        })
    }
}

/// Grammar masks of one step, by sequence.
type Masks = HashMap<SeqId, Result<SimpleVob, GrammarError>>;

fn forward(
    scheduler: &Scheduler,
    model: &QwenModel,
    cache: &mut PagedKvCache,
    out: &SchedulerOutput,
    all_rows: &[bool],
) -> candle_core::Result<Vec<Vec<f32>>> {
    let mut inputs: Vec<(usize, usize, &[u32])> = Vec::with_capacity(out.seqs.len());
    let mut tables: Vec<&[u32]> = Vec::with_capacity(out.seqs.len());
    for (slot, s) in out.seqs.iter().enumerate() {
        let seq = scheduler
            .get(s.id)
            .ok_or_else(|| candle_core::Error::Msg(format!("sequence {} vanished", s.id)))?;
        inputs.push((
            slot,
            s.start_pos,
            &seq.tokens()[s.start_pos..s.start_pos + s.num_tokens],
        ));
        tables.push(seq.block_table.blocks());
    }
    let rows = if all_rows.iter().any(|&a| a) {
        LogitsRows::PerSeq(all_rows.to_vec())
    } else {
        LogitsRows::LastPerSeq
    };
    let batch = Batch::new(&inputs, rows, model.max_positions(), model.device())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    cache.prepare(&batch, &tables)?;
    let logits: Tensor = model.forward(&batch, cache)?;
    logits.to_vec2::<f32>()
}

impl Engine {
    fn postprocess(
        &mut self,
        out: &SchedulerOutput,
        all_rows: &[bool],
        logits: Vec<Vec<f32>>,
        mut masks: Masks,
    ) {
        let ready = self.scheduler.on_step_done(out);
        let mut row = 0;
        for (s, &all) in out.seqs.iter().zip(all_rows) {
            if let Some(state) = self.seqs.get_mut(&s.id) {
                // The first scheduling starts after the prefix-cache hit.
                state.num_cached_tokens.get_or_insert(s.start_pos);
                let arrived = state.arrived;
                state.queue_time.get_or_insert_with(|| arrived.elapsed());
            }
            let rows = if all { s.num_tokens } else { 1 };
            let seq_logits = &logits[row..row + rows];
            row += rows;
            if all {
                self.record_prompt_logprobs(s.id, s.start_pos, seq_logits);
            }
            if ready.contains(&s.id) {
                if let Some(last) = seq_logits.last() {
                    self.sample(s.id, last, masks.remove(&s.id));
                }
            }
        }
    }

    fn record_prompt_logprobs(&mut self, id: SeqId, start_pos: usize, rows: &[Vec<f32>]) {
        let Some(seq) = self.scheduler.get(id) else {
            return;
        };
        let Some(state) = self.seqs.get_mut(&id) else {
            return;
        };
        let prompt = seq.prompt();
        let k = state.request.prompt_logprobs.unwrap_or(0);
        if start_pos >= prompt.len() {
            return; // recomputing after preemption: the prompt logprobs were sent already
        }
        // Entry p is prompt token p's; nothing predicts the first. A recompute starts over.
        state.prompt_logprobs.truncate(start_pos + 1);
        if state.prompt_logprobs.is_empty() {
            state.prompt_logprobs.push(None);
        }
        // Row j predicts prompt token start_pos + j + 1; rows on the pool, each without a
        // vocabulary-sized allocation.
        let targets = &prompt[(start_pos + 1).min(prompt.len())..];
        let rows = &rows[..rows.len().min(targets.len())];
        let lps: Vec<Option<TokenLogprob>> = ember_kernels::on_pool(|| {
            use rayon::prelude::*;
            rows.par_iter()
                .zip(targets)
                .map(|(logits, &token)| Some(token_logprob(logits, token, k)))
                .collect()
        });
        state.prompt_logprobs.extend(lps);
    }

    fn sample(&mut self, id: SeqId, logits: &[f32], mask: Option<Result<SimpleVob, GrammarError>>) {
        let _t = ember_kernels::profile::timer(ember_kernels::profile::OpClass::Sampling);
        let Some(seq) = self.scheduler.get(id) else {
            return;
        };
        let num_output = seq.output().len();
        let Some(state) = self.seqs.get_mut(&id) else {
            return;
        };
        let req = state.request.clone();
        if let Some(Fault::FailSequenceWithToken(t)) = self.hooks.fault {
            if req.prompt.contains(&t) {
                tracing::error!("injected fault: sequence {id} fails");
                self.finish(id, FinishReason::Error, None);
                return;
            }
        }
        // A NaN or +inf logit (a numerical fault in the model) would be sampled as some token
        // silently: the sequence fails instead.
        // One branch-free pass (vectorized) to find out, a second only to name the bad value.
        let is_bad = |l: f32| l.is_nan() | (l == f32::INFINITY);
        if logits.iter().fold(false, |bad, &l| bad | is_bad(l)) {
            let bad = logits
                .iter()
                .copied()
                .find(|&l| is_bad(l))
                .unwrap_or(f32::NAN);
            tracing::error!("sequence {id}: the model produced a logit of {bad}; failing it");
            self.finish(id, FinishReason::Error, None);
            return;
        }
        if num_output == 0 {
            // The prompt is done: prompt logprobs first, then fork the other completions.
            if state.wants_prompt_logprobs {
                state.wants_prompt_logprobs = false;
                let lps = std::mem::take(&mut state.prompt_logprobs);
                let _ = state.events.send(EngineEvent::PromptLogprobs(lps));
                self.scheduler.clear_full_logits(id);
            }
            let children = std::mem::take(&mut state.children_to_fork);
            let events = state.events.clone();
            let arrived = state.arrived;
            if state.index == 0 {
                self.stats.num_prompt_tokens += req.prompt.len() as u64;
            }
            for i in 1..=children {
                self.add_sequence(req.clone(), events.clone(), i, 0, arrived);
            }
        }
        let Some(state) = self.seqs.get_mut(&id) else {
            return;
        };
        // A constrained sequence needs its mask (computed beside the forward pass; here only
        // if that was not possible).
        let mask = match (&mut state.constraint, mask) {
            (Some(c), None) if c.is_active() => {
                let started = Instant::now();
                let mask = c.compute_mask();
                self.stats.num_grammar_masks += 1;
                self.stats.grammar_wait_seconds += started.elapsed().as_secs_f64();
                mask
            }
            (_, mask) => mask,
        };
        let mask = match mask.transpose() {
            Ok(mask) => mask,
            Err(e) => {
                tracing::error!("sequence {id}: the grammar failed: {e}");
                self.finish(id, FinishReason::Error, None);
                return;
            }
        };
        let Some(state) = self.seqs.get_mut(&id) else {
            return;
        };
        let grammar_complete = state.constraint.as_ref().is_some_and(|c| c.is_complete());
        let banned: Vec<u32> = if grammar_complete {
            // Only an end token fits the grammar now: min_tokens cannot hold it back.
            Vec::new()
        } else if !req.ignore_eos && num_output < req.min_tokens {
            self.eos_token_ids
                .iter()
                .chain(&req.stop_token_ids)
                .copied()
                .collect()
        } else if num_output < req.min_tokens {
            req.stop_token_ids.clone()
        } else {
            Vec::new()
        };
        let forced = self.hooks.forced_output.as_ref().and_then(|script| {
            script
                .get(num_output)
                .or_else(|| {
                    (!req.ignore_eos)
                        .then(|| self.eos_token_ids.first())
                        .flatten()
                })
                .copied()
        });
        let SampledToken {
            token,
            logprob,
            top_logprobs,
        } = state
            .sampler
            .sample_or_force(logits, &banned, mask.as_ref(), forced);
        self.scheduler.append_token(id, token);
        self.stats.num_generated_tokens += 1;
        let num_generated = num_output + 1;
        let logprob = req.sampling.top_logprobs.map(|_| TokenLogprob {
            token,
            logprob,
            top: top_logprobs,
        });
        let stop_token = (!req.ignore_eos && self.eos_token_ids.contains(&token))
            || req.stop_token_ids.contains(&token);
        let mut grammar_done = false;
        if let (Some(c), false) = (&mut state.constraint, stop_token) {
            if let Err(e) = c.on_token(token) {
                tracing::error!("sequence {id}: token {token} does not fit the grammar: {e}");
                self.finish(id, FinishReason::Error, None);
                return;
            }
            // Complete with no end token to close it (ignore_eos): it ends here.
            grammar_done = c.is_complete() && !c.has_end_tokens();
        }
        let delta = if stop_token {
            state.detok.finish(&self.tokenizer)
        } else {
            state.detok.push(&self.tokenizer, token)
        };
        let _ = state.events.send(EngineEvent::Token {
            index: state.index,
            token,
            text: delta.text,
            logprob,
        });
        if stop_token {
            self.finish(id, FinishReason::Stop, Some(StopReason::Token(token)));
        } else if grammar_done {
            self.finish(id, FinishReason::Stop, None);
        } else if let Some(stop) = delta.stopped_by {
            self.finish(id, FinishReason::Stop, Some(StopReason::Text(stop)));
        } else if num_generated >= req.max_tokens {
            self.finish(id, FinishReason::Length, None);
        }
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason, stop_reason: Option<StopReason>) {
        let seq = self.scheduler.remove(id);
        let Some(mut state) = self.seqs.remove(&id) else {
            return;
        };
        let tail = state.detok.finish(&self.tokenizer);
        if !tail.text.is_empty() {
            // Text held back for stop-string matching.
            let _ = state.events.send(EngineEvent::Text {
                index: state.index,
                text: tail.text,
            });
        }
        let (prompt, generated) = seq.map_or((0, 0), |s| (s.prompt().len(), s.output().len()));
        // Counted and published before the client hears of the end: a scrape that follows a
        // finished response always includes it.
        self.stats.record_finish(reason);
        self.publish_stats();
        let _ = state.events.send(EngineEvent::Finished {
            index: state.index,
            reason,
            stop_reason,
            num_prompt_tokens: prompt,
            num_generated_tokens: generated,
            num_cached_tokens: state.num_cached_tokens.unwrap_or(0),
            queue_time: state.queue_time.unwrap_or_default(),
        });
    }
}

fn prompt_len_of(scheduler: &Scheduler, id: SeqId) -> usize {
    scheduler.get(id).map_or(0, |s| s.prompt().len())
}
