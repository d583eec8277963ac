//! The engine for async runtimes (feature `tokio`).
//!
//! The engine is blocking by design (see the README): each call waits on QEMU with a
//! deadline. [`AsyncEngine`] runs every call on tokio's blocking pool
//! (`spawn_blocking`), so a plug waiting for `query-pci` or an unplug waiting out its
//! deadline never stalls the executor, and calls on different ports still run at the
//! same time. Queries that do not talk to QEMU (`device`, `on_port`, `is_port_free`) are cheap and
//! stay on [`AsyncEngine::engine`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::client::QmpClient;
use crate::engine::{Engine, EngineError, EngineOptions, RecoveryReport, UnplugOutcome};
use crate::request::PlugRequest;
use crate::state::DeviceRecord;
use pcie_topology::QemuId;

/// What an async call can end in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AsyncError {
    /// The engine's own error.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The blocking task did not finish (the runtime shut down, or it panicked).
    #[error("the engine's blocking task did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, AsyncError>;

/// An [`Engine`] for tokio: every operation that talks to QEMU runs on the blocking pool.
#[derive(Debug, Clone)]
pub struct AsyncEngine {
    engine: Arc<Engine>,
}

impl AsyncEngine {
    /// [`Engine::open`] on the blocking pool: opens the journal and recovers what a
    /// previous process left unfinished.
    pub async fn open(
        client: Arc<QmpClient>,
        journal: impl Into<PathBuf>,
        options: EngineOptions,
    ) -> Result<(AsyncEngine, RecoveryReport)> {
        let journal = journal.into();
        let (engine, report) =
            tokio::task::spawn_blocking(move || Engine::open(client, journal, options)).await??;
        Ok((AsyncEngine { engine: Arc::new(engine) }, report))
    }

    /// Wraps an engine already open.
    pub fn new(engine: Arc<Engine>) -> Self {
        AsyncEngine { engine }
    }

    /// The blocking engine, for calls that do not wait on QEMU.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// [`Engine::plug`] on the blocking pool.
    pub async fn plug(&self, request: PlugRequest) -> Result<DeviceRecord> {
        let engine = Arc::clone(&self.engine);
        Ok(tokio::task::spawn_blocking(move || engine.plug(request)).await??)
    }

    /// [`Engine::unplug`] (by device id) on the blocking pool.
    pub async fn unplug(&self, device: impl Into<String>) -> Result<UnplugOutcome> {
        let engine = Arc::clone(&self.engine);
        let device = device.into();
        Ok(tokio::task::spawn_blocking(move || engine.unplug(&device)).await??)
    }

    /// [`Engine::complete_pending`] on the blocking pool.
    pub async fn complete_pending(&self) -> Result<Vec<QemuId>> {
        let engine = Arc::clone(&self.engine);
        Ok(tokio::task::spawn_blocking(move || engine.complete_pending()).await??)
    }
}
