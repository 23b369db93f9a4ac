//! The engine on the tiny fixtures: continuous batching equals single runs and transformers'
//! golden continuations; seeded sampling does not depend on the batch; prefix caching skips a
//! shared prefix; a small cache completes everything through preemption; dropping a stream
//! frees its blocks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ember::device::DeviceSpec;
use ember::engine::detokenizer::TokenBytes;
use ember::engine::{
    ConstraintStart, EngineConfig, EngineEvent, EngineHandle, FinishReason, GrammarCompiler,
    GrammarSpec, KvCacheBudget, RequestStream, SamplingParams, ValidConstraint, ValidRequest,
};
use ember::model::LoadedModel;
use ember_models::PagedKvCache;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    prompt_ids: Vec<Vec<u32>>,
    greedy: Vec<Vec<u32>>,
}

fn fixture(name: &str) -> (LoadedModel, Golden) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name);
    let golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    (
        LoadedModel::load(dir.to_str().unwrap(), None, DeviceSpec::Cpu, None).unwrap(),
        golden,
    )
}

fn engine(name: &str, cfg: EngineConfig) -> (EngineHandle, Golden) {
    let (loaded, golden) = fixture(name);
    let (handle, _thread) = EngineHandle::spawn(loaded, &cfg).unwrap();
    (handle, golden)
}

/// KV-cache bytes for `blocks` blocks of 16 tokens of a fixture model (f32).
fn cache_bytes(name: &str, blocks: usize) -> usize {
    let (loaded, _) = fixture(name);
    blocks * PagedKvCache::bytes_per_block(loaded.model.config(), 16, loaded.model.dtype())
}

#[derive(Debug, Default, Clone)]
struct Completion {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    reason: Option<FinishReason>,
    num_cached_tokens: usize,
}

/// Collects a stream's completions (indexed by choice).
fn collect(mut stream: RequestStream, n: usize) -> Vec<Completion> {
    let mut out = vec![Completion::default(); n];
    let mut done = 0;
    while done < n {
        match stream
            .blocking_recv()
            .expect("the engine ended the stream early")
        {
            EngineEvent::Token {
                index,
                token,
                text,
                logprob,
            } => {
                out[index].tokens.push(token);
                out[index].text.push_str(&text);
                out[index].logprobs.extend(logprob.map(|l| l.logprob));
            }
            EngineEvent::Text { index, text } => out[index].text.push_str(&text),
            EngineEvent::Finished {
                index,
                reason,
                num_cached_tokens,
                ..
            } => {
                out[index].reason = Some(reason);
                out[index].num_cached_tokens = num_cached_tokens;
                done += 1;
            }
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
    out
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> ValidRequest {
    let mut r = ValidRequest::greedy(prompt, max_tokens);
    r.ignore_eos = true;
    r.sampling.top_logprobs = Some(0);
    r
}

/// Prompts of mixed lengths over the fixture vocabulary (ids below 500).
fn extra_prompts(count: usize) -> Vec<Vec<u32>> {
    (0..count)
        .map(|i| {
            (0..3 + 5 * i)
                .map(|j| ((i * 131 + j * 17) % 480) as u32 + 10)
                .collect()
        })
        .collect()
}

fn small_config() -> EngineConfig {
    EngineConfig {
        kv_cache: KvCacheBudget::Bytes(64 << 20),
        ..EngineConfig::default()
    }
}

#[test]
fn sixteen_concurrent_requests_equal_single_runs_and_transformers() {
    for name in ["qwen2", "qwen3-moe"] {
        let (handle, golden) = engine(name, small_config());
        // Sixteen prompts of 1 to ~80 tokens, each with transformers' greedy continuation.
        let prompts: Vec<Vec<u32>> = golden.prompt_ids.clone();
        assert_eq!(prompts.len(), 16);
        // Single runs, one at a time.
        let singles: Vec<Completion> = prompts
            .iter()
            .map(|p| collect(handle.submit(greedy(p.clone(), 32)).unwrap(), 1).remove(0))
            .collect();
        // All sixteen at once.
        let streams: Vec<RequestStream> = prompts
            .iter()
            .map(|p| handle.submit(greedy(p.clone(), 32)).unwrap())
            .collect();
        let batched: Vec<Completion> = streams
            .into_iter()
            .map(|s| collect(s, 1).remove(0))
            .collect();
        for (i, (single, batch)) in singles.iter().zip(&batched).enumerate() {
            assert_eq!(
                batch.tokens, single.tokens,
                "{name} request {i}: batched tokens differ from the single run"
            );
            // Batch invariance, bit for bit: the same log-probabilities whatever the batch.
            assert_eq!(
                batch.logprobs, single.logprobs,
                "{name} request {i}: logprobs depend on the batch"
            );
            assert_eq!(batch.reason, Some(FinishReason::Length));
            assert_eq!(
                batch.tokens, golden.greedy[i],
                "{name} request {i}: differs from transformers"
            );
        }
    }
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let (handle, golden) = engine("qwen3", small_config());
    let mut request = ValidRequest::greedy(golden.prompt_ids[0].clone(), 24);
    request.ignore_eos = true;
    request.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        seed: Some(1234),
        ..Default::default()
    };
    let alone = collect(handle.submit(request.clone()).unwrap(), 1)
        .remove(0)
        .tokens;
    // Same request amid others, twice with different neighbours.
    for salt in 0..2 {
        let others: Vec<RequestStream> = extra_prompts(6 + salt)
            .into_iter()
            .map(|p| {
                let mut r = ValidRequest::greedy(p, 10 + salt * 7);
                r.sampling = SamplingParams {
                    temperature: 1.0,
                    seed: Some(salt as u64),
                    ..Default::default()
                };
                handle.submit(r).unwrap()
            })
            .collect();
        let mixed = collect(handle.submit(request.clone()).unwrap(), 1)
            .remove(0)
            .tokens;
        assert_eq!(mixed, alone, "mix {salt}");
        for s in others {
            collect(s, 1);
        }
    }
    assert_ne!(
        alone,
        golden.greedy[0][..24].to_vec(),
        "sampling should leave the greedy path"
    );
}

#[test]
fn a_shared_64_token_prefix_is_computed_once() {
    let (handle, _) = engine("qwen2", small_config());
    let prefix: Vec<u32> = (0..64).map(|i| (i * 37 % 480) as u32 + 5).collect();
    let mut first = prefix.clone();
    first.extend([7, 8, 9]);
    let mut second = prefix.clone();
    second.extend([100, 101, 102, 103, 104]);
    let a = collect(handle.submit(greedy(first, 4)).unwrap(), 1).remove(0);
    assert_eq!(a.num_cached_tokens, 0);
    let before = handle.stats().unwrap();
    let b = collect(handle.submit(greedy(second.clone(), 4)).unwrap(), 1).remove(0);
    let after = handle.stats().unwrap();
    assert_eq!(
        b.num_cached_tokens, 64,
        "only the 5-token suffix is computed"
    );
    assert_eq!(
        after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens,
        64
    );
    // The same tokens as without the cache.
    let (fresh, _) = engine(
        "qwen2",
        EngineConfig {
            enable_prefix_caching: false,
            ..small_config()
        },
    );
    let c = collect(fresh.submit(greedy(second, 4)).unwrap(), 1).remove(0);
    assert_eq!(c.num_cached_tokens, 0);
    assert_eq!(b.tokens, c.tokens);
}

#[test]
fn a_cache_for_two_requests_completes_sixteen_through_preemption() {
    // Each request needs up to 3 blocks (<= 18 prompt + 32 generated tokens); 6 blocks hold two.
    let cfg = EngineConfig {
        kv_cache: KvCacheBudget::Bytes(cache_bytes("qwen3", 6)),
        max_num_batched_tokens: 64,
        ..EngineConfig::default()
    };
    let (handle, golden) = engine("qwen3", cfg);
    // Short prompts (the first four golden ones and four more), so that one request fits.
    let mut prompts: Vec<Vec<u32>> = golden.prompt_ids[..4].to_vec();
    prompts.extend(extra_prompts(4));
    prompts = prompts.into_iter().cycle().take(16).collect();
    let streams: Vec<RequestStream> = prompts
        .iter()
        .map(|p| handle.submit(greedy(p.clone(), 32)).unwrap())
        .collect();
    let results: Vec<Completion> = streams
        .into_iter()
        .map(|s| collect(s, 1).remove(0))
        .collect();
    let (reference, _) = engine("qwen3", small_config());
    for (i, (p, r)) in prompts.iter().zip(&results).enumerate() {
        let expected = collect(reference.submit(greedy(p.clone(), 32)).unwrap(), 1).remove(0);
        assert_eq!(r.tokens, expected.tokens, "request {i}");
        if let Some(g) = golden.prompt_ids.iter().position(|gp| gp == p) {
            assert_eq!(r.tokens, golden.greedy[g], "request {i} vs transformers");
        }
    }
    let stats = handle.stats().unwrap();
    assert!(
        stats.num_preemptions > 0,
        "expected preemptions with a 6-block cache: {stats:?}"
    );
    assert_eq!(stats.num_free_blocks, stats.num_blocks);
}

#[test]
fn constrained_sequences_survive_preemption_with_their_tokens() {
    // Seeded sampling under a regex: through preemption (6 blocks for 8 requests of up to 3
    // blocks each, n = 2) every completion matches and equals its run on a roomy cache.
    let (loaded, _) = fixture("qwen3");
    let table = TokenBytes::new(&loaded.tokenizer).expect("byte-level fixture tokenizer");
    let compiler = GrammarCompiler::new(
        &table,
        loaded.model.config().vocab_size,
        &loaded.eos_token_ids,
    )
    .unwrap();
    let rx = "[a-z]{3,6}( [a-z]{3,6}){4,6}\\.";
    let constraint = ValidConstraint {
        grammar: compiler.compile(&GrammarSpec::Regex(rx.into())).unwrap(),
        start: ConstraintStart::Now { think: None },
    };
    let request = |i: usize| {
        let mut r = ValidRequest::greedy(extra_prompts(4)[i % 4].clone(), 40);
        r.sampling = SamplingParams {
            temperature: 1.0,
            seed: Some(i as u64),
            ..SamplingParams::default()
        };
        r.n = 2;
        r.constraint = Some(constraint.clone());
        r
    };
    let cfg = EngineConfig {
        kv_cache: KvCacheBudget::Bytes(cache_bytes("qwen3", 6)),
        max_num_batched_tokens: 64,
        ..EngineConfig::default()
    };
    let (handle, _) = engine("qwen3", cfg);
    let streams: Vec<RequestStream> = (0..8).map(|i| handle.submit(request(i)).unwrap()).collect();
    let results: Vec<Vec<Completion>> = streams.into_iter().map(|s| collect(s, 2)).collect();
    assert!(
        handle.stats().unwrap().num_preemptions > 0,
        "expected preemptions"
    );
    let full = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
    let (reference, _) = engine("qwen3", small_config());
    for (i, got) in results.iter().enumerate() {
        let expected = collect(reference.submit(request(i)).unwrap(), 2);
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(
                g.reason,
                Some(FinishReason::Stop),
                "request {i}: {:?}",
                g.text
            );
            assert!(full.is_match(&g.text), "request {i}: {:?}", g.text);
            assert_eq!(g.tokens, e.tokens, "request {i}");
        }
    }
}

#[test]
fn dropping_the_stream_aborts_and_frees_blocks() {
    let (handle, golden) = engine("qwen2", small_config());
    let mut stream = handle
        .submit(greedy(golden.prompt_ids[0].clone(), 400))
        .unwrap();
    assert!(matches!(
        stream.blocking_recv(),
        Some(EngineEvent::Token { .. })
    ));
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = handle.stats().unwrap();
        if stats.num_aborted == 1
            && stats.num_free_blocks == stats.num_blocks
            && stats.num_running == 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "not aborted: {stats:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The engine still serves others.
    let c = collect(
        handle
            .submit(greedy(golden.prompt_ids[1].clone(), 32))
            .unwrap(),
        1,
    )
    .remove(0);
    assert_eq!(c.tokens, golden.greedy[1]);
}

#[test]
fn n_completions_share_the_prompt_and_seeds_differ_per_completion() {
    let (handle, _) = engine("qwen3", small_config());
    let prompt = extra_prompts(8).pop().unwrap(); // 38 tokens: two full blocks
    let mut r = ValidRequest::greedy(prompt.clone(), 12);
    r.ignore_eos = true;
    r.n = 3;
    r.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..Default::default()
    };
    let a = collect(handle.submit(r.clone()).unwrap(), 3);
    let b = collect(handle.submit(r).unwrap(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tokens.len(), 12);
        assert_eq!(x.tokens, y.tokens, "seeded n>1 is reproducible");
    }
    assert!(
        a[0].tokens != a[1].tokens || a[1].tokens != a[2].tokens,
        "completions differ"
    );
    // The forked completions found the prompt's full blocks cached.
    assert!(
        a[1..].iter().all(|c| c.num_cached_tokens == 32),
        "{:?}",
        a.iter().map(|c| c.num_cached_tokens).collect::<Vec<_>>()
    );
}

/// Echo + logprobs with n > 1: the prompt's logprobs are computed and sent once (by the first
/// completion), the other completions find its blocks in the prefix cache, and the values are
/// those of a single completion's request.
#[test]
fn prompt_logprobs_are_computed_once_for_n_completions() {
    let (handle, _) = engine("qwen3", small_config());
    let prompt = extra_prompts(8).pop().unwrap(); // 38 tokens: two full blocks
    let mut r = greedy(prompt.clone(), 4);
    r.prompt_logprobs = Some(2);
    let single = {
        let mut stream = handle.submit(r.clone()).unwrap();
        let Some(EngineEvent::PromptLogprobs(lps)) = stream.blocking_recv() else {
            panic!("prompt logprobs come first");
        };
        collect(stream, 1);
        lps
    };
    r.n = 3;
    let mut stream = handle.submit(r).unwrap();
    let mut sent = Vec::new();
    let mut cached = [None; 3];
    while cached.iter().any(Option::is_none) {
        match stream.blocking_recv().expect("stream ended early") {
            EngineEvent::PromptLogprobs(lps) => sent.push(lps),
            EngineEvent::Finished {
                index,
                num_cached_tokens,
                ..
            } => cached[index] = Some(num_cached_tokens),
            _ => {}
        }
    }
    assert_eq!(
        sent.len(),
        1,
        "prompt logprobs sent once, not per completion"
    );
    assert_eq!(sent[0], single);
    assert_eq!(
        cached[0],
        Some(0),
        "the first completion computes every prompt row"
    );
    assert_eq!(
        cached[1..],
        [Some(32), Some(32)],
        "the others reuse its blocks"
    );
}

#[test]
fn stop_strings_stop_tokens_min_tokens_and_eos() {
    let (handle, golden) = engine("qwen2", small_config());
    let tokenizer = tokenizers::Tokenizer::from_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/qwen2/tokenizer.json"),
    )
    .unwrap();
    let full_text = tokenizer.decode(&golden.greedy[0], true).unwrap();
    // A stop string from the middle of the golden text: output is the text before it.
    let chars: Vec<char> = full_text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let expected_prefix = &full_text[..full_text.find(&stop).unwrap()];
    let mut r = greedy(golden.prompt_ids[0].clone(), 32);
    r.stop = vec![stop.clone()];
    let c = collect(handle.submit(r).unwrap(), 1).remove(0);
    assert_eq!(c.reason, Some(FinishReason::Stop));
    assert_eq!(c.text, expected_prefix);
    // A stop token: the fifth golden token.
    let mut r = greedy(golden.prompt_ids[0].clone(), 32);
    r.stop_token_ids = vec![golden.greedy[0][4]];
    let first = golden.greedy[0]
        .iter()
        .position(|&t| t == golden.greedy[0][4])
        .unwrap();
    let c = collect(handle.submit(r.clone()).unwrap(), 1).remove(0);
    assert_eq!(c.reason, Some(FinishReason::Stop));
    assert_eq!(c.tokens, golden.greedy[0][..=first].to_vec());
    // min_tokens bans it until then.
    r.min_tokens = first + 1;
    let c = collect(handle.submit(r).unwrap(), 1).remove(0);
    assert!(c.tokens.len() > first + 1);
    assert!(c.tokens[..=first].iter().all(|&t| t != golden.greedy[0][4]));
}

#[test]
fn bad_requests_are_refused_at_submit() {
    let (handle, _) = engine("qwen2", small_config());
    let limits = handle.limits();
    assert!(handle.submit(ValidRequest::greedy(vec![], 4)).is_err());
    assert!(handle.submit(ValidRequest::greedy(vec![1], 0)).is_err());
    assert!(handle
        .submit(ValidRequest::greedy(vec![limits.vocab_size as u32], 4))
        .is_err());
    let err = handle
        .submit(ValidRequest::greedy(vec![1; 10], limits.max_model_len))
        .unwrap_err();
    assert!(err.to_string().contains("context length"), "{err}");
}

#[test]
fn prompt_logprobs_match_transformers_across_prefill_chunks() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen3");
    let golden_logits =
        candle_core::safetensors::load(dir.join("golden.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    // A 4-token step budget splits every prompt into several prefill chunks.
    for budget in [2048, 4] {
        let (handle, golden) = engine(
            "qwen3",
            EngineConfig {
                max_num_batched_tokens: budget,
                ..small_config()
            },
        );
        // The prompts with golden logits.
        for (i, prompt) in golden.prompt_ids.iter().enumerate().take(4) {
            let mut r = greedy(prompt.clone(), 1);
            r.prompt_logprobs = Some(3);
            let mut stream = handle.submit(r).unwrap();
            let Some(EngineEvent::PromptLogprobs(lps)) = stream.blocking_recv() else {
                panic!("prompt logprobs come first");
            };
            assert_eq!(lps.len(), prompt.len());
            assert!(lps[0].is_none(), "nothing predicts the first token");
            let rows = golden_logits[&format!("logits.{i}")]
                .to_vec2::<f32>()
                .unwrap();
            for (p, lp) in lps.iter().enumerate().skip(1) {
                let lp = lp.as_ref().unwrap();
                let reference = ember::engine::sampler::log_softmax(&rows[p - 1]);
                assert_eq!(lp.token, prompt[p]);
                let diff = (lp.logprob - reference[prompt[p] as usize]).abs();
                assert!(
                    diff < 1e-4,
                    "budget {budget} prompt {i} position {p}: {diff}"
                );
                assert_eq!(lp.top.len(), 3);
                assert_eq!(lp.top[0].0, ember::engine::sampler::argmax(&rows[p - 1]));
            }
        }
    }
}

/// Every test above, rerun on each other instruction-set path this CPU supports
/// (`EMBER_CPU_ISA`); bit-identity must hold within each path.
#[test]
fn every_cpu_isa_path() {
    match ember_kernels::rerun_tests_on_other_isas("every_cpu_isa_path") {
        Ok(paths) => eprintln!("also passed with EMBER_CPU_ISA = {paths:?}"),
        Err(failure) => panic!("{failure}"),
    }
}
