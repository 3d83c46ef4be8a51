//! A blocking face of the async client, for synchronous callers (the test harness).
//!
//! [`BlockingQmp`] owns a small tokio runtime and a negotiated [`Qmp`] session on it; every
//! method runs the async command to completion on that runtime. The runtime has one worker
//! thread of its own, so the session's reader task keeps taking replies and events while the
//! caller is not inside a call, and a future that spans two sessions (the
//! [`crate::migration::MigrationPair`] of a source and a destination, each owned by its own
//! `BlockingQmp`) can be driven with [`BlockingQmp::block_on`] of either.
//!
//! Like any tokio `block_on`, the methods must not be called from inside an async task (use
//! [`Qmp`] there, or `tokio::task::block_in_place`). Dropping a `BlockingQmp` is allowed
//! anywhere, async tasks included.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::client::{Qmp, QmpConfig};
use crate::error::{QmpError, Result};
use crate::types::{
    CapabilityState, Event, Greeting, MigrationInfo, MigrationParameters, RunState,
    RxFilterInfo, StatusInfo,
};

/// A negotiated QMP session with blocking methods.
pub struct BlockingQmp {
    // Declared first: dropped (reader task aborted) before the runtime goes.
    client: Qmp,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for BlockingQmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingQmp")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Drop for BlockingQmp {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Does not wait for the reader task, and unlike dropping the runtime it is allowed
            // inside an async context.
            runtime.shutdown_background();
        }
    }
}

impl BlockingQmp {
    /// Connects to QEMU's QMP unix socket, retrying while it does not exist yet or refuses
    /// connections, and negotiates capabilities. `timeout` bounds the connect and, later,
    /// each command ([`QmpConfig::connect_timeout`] and [`QmpConfig::command_timeout`]).
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<BlockingQmp> {
        let config = QmpConfig {
            connect_timeout: timeout,
            command_timeout: timeout,
            ..QmpConfig::default()
        };
        Self::connect_with(path, config)
    }

    /// [`BlockingQmp::connect`] with every limit of [`QmpConfig`].
    pub fn connect_with(path: impl AsRef<Path>, config: QmpConfig) -> Result<BlockingQmp> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-qmp")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| QmpError::io("starting the QMP client's runtime", e))?;
        let client = runtime.block_on(Qmp::connect(path, config))?;
        Ok(BlockingQmp {
            client,
            runtime: Some(runtime),
        })
    }

    /// The async session, e.g. to build a future for [`BlockingQmp::block_on`].
    pub fn client(&self) -> &Qmp {
        &self.client
    }

    /// Runs `future` to completion on this session's runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        match &self.runtime {
            Some(runtime) => runtime.block_on(future),
            // Only `drop` takes the runtime.
            None => unreachable!("BlockingQmp used after drop"),
        }
    }

    /// The greeting QEMU sent (its version).
    pub fn greeting(&self) -> &Greeting {
        self.client.greeting()
    }

    /// Changes the time limit of later commands.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.client.set_command_timeout(timeout);
    }

    /// Runs `command` and returns QEMU's raw `return` value ([`Qmp::execute_value`]).
    pub fn execute_value(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.block_on(self.client.execute_value(command, arguments))
    }

    /// `query-status`.
    pub fn query_status(&self) -> Result<StatusInfo> {
        self.block_on(self.client.query_status())
    }

    /// Polls `query-status` every 50 ms until the run state is `want` ([`Qmp::wait_status`]).
    pub fn wait_status(&self, want: &RunState, timeout: Duration) -> Result<StatusInfo> {
        self.block_on(
            self.client
                .wait_status(want, crate::migration::POLL_INTERVAL, timeout),
        )
    }

    /// `stop`: pauses the vCPUs.
    pub fn stop(&self) -> Result<()> {
        self.block_on(self.client.stop())
    }

    /// `cont`: resumes the vCPUs.
    pub fn cont(&self) -> Result<()> {
        self.block_on(self.client.cont())
    }

    /// `migrate-set-capabilities`.
    pub fn migrate_set_capabilities(&self, capabilities: &[CapabilityState]) -> Result<()> {
        self.block_on(self.client.migrate_set_capabilities(capabilities))
    }

    /// `query-migrate-capabilities`.
    pub fn query_migrate_capabilities(&self) -> Result<Vec<CapabilityState>> {
        self.block_on(self.client.query_migrate_capabilities())
    }

    /// `migrate-set-parameters` with the fields of `params` that are `Some`.
    pub fn migrate_set_parameters(&self, params: &MigrationParameters) -> Result<()> {
        self.block_on(self.client.migrate_set_parameters(params))
    }

    /// `query-migrate-parameters`.
    pub fn query_migrate_parameters(&self) -> Result<MigrationParameters> {
        self.block_on(self.client.query_migrate_parameters())
    }

    /// `migrate` to `uri`; returns once QEMU has started the migration.
    pub fn migrate(&self, uri: &str) -> Result<()> {
        self.block_on(self.client.migrate(uri))
    }

    /// `migrate-incoming` on a VM started with `-incoming defer`. `tcp:127.0.0.1:0` picks a
    /// free port: read it from [`MigrationInfo::listen_ports`] of [`BlockingQmp::query_migrate`].
    pub fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.block_on(self.client.migrate_incoming(uri))
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&self) -> Result<()> {
        self.block_on(self.client.migrate_cancel())
    }

    /// `query-migrate`.
    pub fn query_migrate(&self) -> Result<MigrationInfo> {
        self.block_on(self.client.query_migrate())
    }

    /// Polls `query-migrate` every 50 ms until the status is terminal and returns that
    /// reply ([`Qmp::wait_migration`]; a failed migration is `Ok` too: check its status).
    pub fn wait_migration(&self, timeout: Duration) -> Result<MigrationInfo> {
        self.block_on(
            self.client
                .wait_migration(crate::migration::POLL_INTERVAL, timeout),
        )
    }

    /// `query-rx-filter`: the virtio-net NICs with their current MAC.
    pub fn query_rx_filter(&self) -> Result<Vec<RxFilterInfo>> {
        self.block_on(self.client.query_rx_filter())
    }

    /// `dump-guest-memory` of the whole RAM to `protocol` ([`Qmp::dump_guest_memory`]).
    pub fn dump_guest_memory(&self, protocol: &str) -> Result<()> {
        self.block_on(self.client.dump_guest_memory(protocol))
    }

    /// `quit`: QEMU exits; a connection that closes before the reply counts as success.
    pub fn quit(&self) -> Result<()> {
        self.block_on(self.client.quit())
    }

    /// Takes every buffered event.
    pub fn drain_events(&self) -> Vec<Event> {
        self.client.drain_events()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qemu::FakeQemu;
    use serde_json::json;

    #[test]
    fn blocking_calls_reach_qemu_and_drop_is_allowed_in_async_code() {
        let fake = FakeQemu::start(Box::new(|name, _| match name {
            "query-status" => Ok(json!({"status": "running", "running": true})),
            "stop" => Ok(json!({})),
            other => Err(("CommandNotFound".into(), format!("no {other}"))),
        }));
        let qmp = BlockingQmp::connect(&fake.path, Duration::from_secs(5)).expect("connect");
        assert_eq!(qmp.greeting().version.qemu.minor, 2);
        let status = qmp.query_status().expect("query-status");
        assert_eq!((status.status, status.running), (RunState::Running, true));
        assert_eq!(
            qmp.wait_status(&RunState::Running, Duration::from_secs(5))
                .expect("already running")
                .status,
            RunState::Running
        );
        qmp.stop().expect("stop");
        let err = qmp.cont().expect_err("the fake does not know cont");
        assert_eq!(err.class(), Some("CommandNotFound"));
        let names: Vec<String> = fake.commands().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["query-status", "query-status", "stop", "cont"]);
        // Dropping inside an async task must not panic (the runtime shuts down in the
        // background).
        let outer = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        outer.block_on(async move { drop(qmp) });
    }
}
