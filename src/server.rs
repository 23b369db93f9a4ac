//! `ember serve`: binds first (so /health answers 503 while the model loads), loads the model
//! and starts the engine, serves until told to stop, then drains: /health turns 503, new
//! requests are refused, in-flight ones may finish within the shutdown timeout.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::api::{self, AppState, ModelContext};
use crate::engine::{EngineConfig, EngineHandle};
use crate::model::LoadedModel;

/// How long the HTTP server may take to close its connections once draining is over.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often the server checks that the engine thread is alive.
const ENGINE_CHECK: Duration = Duration::from_millis(100);
/// After the engine dies, how long /health keeps answering 503 before the port closes, even
/// with nothing in flight: a load balancer's probe sees the failure and takes the instance out
/// instead of finding only a refused connection (and a test can observe it).
const DEAD_ENGINE_HOLD: Duration = Duration::from_secs(2);

/// Loads the model (blocking) and starts the engine thread.
pub fn start_engine(loaded: LoadedModel, cfg: &EngineConfig) -> Result<ModelContext> {
    let tokenizer = loaded.tokenizer.clone();
    let template = loaded.template.clone();
    let defaults = loaded.defaults.clone();
    let model = &loaded.model;
    let (arch, dtype) = (model.config().arch, model.dtype());
    let device = if model.device().is_cpu() {
        format!("cpu ({} kernels)", ember_kernels::cpu_isa())
    } else {
        format!("{:?}", model.device().location())
    };
    let (engine, _thread) = EngineHandle::spawn(loaded, cfg)?;
    let limits = engine.limits();
    tracing::info!(
        ?arch,
        ?dtype,
        device = %device,
        max_model_len = limits.max_model_len,
        kv_cache_tokens = limits.max_cache_tokens,
        kv_blocks = limits.num_blocks,
        block_size = limits.block_size,
        max_num_seqs = cfg.max_num_seqs,
        max_num_batched_tokens = cfg.max_num_batched_tokens,
        prefix_caching = cfg.enable_prefix_caching,
        "engine started"
    );
    Ok(ModelContext::new(engine, tokenizer, template, defaults))
}

/// Serves `state` on `listener` until `shutdown` resolves. `load` runs on a blocking thread
/// while the server already answers; its failure ends the server with that error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    load: impl FnOnce() -> Result<ModelContext> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send,
    shutdown_timeout: Duration,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = api::router(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    let mut loading = tokio::task::spawn_blocking(load);
    let mut loaded = false;
    let mut engine_check = tokio::time::interval(ENGINE_CHECK);
    let mut engine_failed = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            result = &mut loading, if !loaded => {
                loaded = true;
                match result {
                    Ok(Ok(ctx)) => {
                        state.set_ready(ctx);
                        tracing::info!("ready");
                    }
                    Ok(Err(e)) => {
                        let _ = stop_tx.send(());
                        return Err(e);
                    }
                    Err(e) => {
                        let _ = stop_tx.send(());
                        return Err(anyhow!("model loading panicked: {e}"));
                    }
                }
            }
            _ = engine_check.tick(), if loaded => {
                if state.engine_failed() {
                    tracing::error!("the engine has stopped; draining, then exiting with an error");
                    engine_failed = true;
                    break;
                }
            }
            _ = &mut shutdown => break,
        }
    }
    state.start_draining();
    let draining = Instant::now();
    let deadline = draining + shutdown_timeout;
    tracing::info!(
        in_flight = state.num_in_flight(),
        "shutting down; {} sequence(s) in flight",
        state.num_in_flight()
    );
    while state.num_in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if state.num_in_flight() > 0 {
        tracing::warn!(
            "shutdown timeout: dropping {} request(s)",
            state.num_in_flight()
        );
    }
    if engine_failed {
        tokio::time::sleep(DEAD_ENGINE_HOLD.saturating_sub(draining.elapsed())).await;
    }
    let _ = stop_tx.send(());
    let closed = tokio::time::timeout(CLOSE_GRACE, server).await;
    if engine_failed {
        return Err(anyhow!("the engine stopped (see the log above)"));
    }
    match closed {
        Ok(Ok(Err(e))) => Err(e.into()),
        _ => Ok(()),
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
