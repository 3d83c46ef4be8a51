//! `ferry-host resolve`: ends the one state a migration cannot decide by itself. When the source
//! committed and then heard nothing (the destination, its gateway or the link went away at the
//! worst moment), both VMs may be paused and only someone who asks both sides can start exactly
//! one. Resolve asks: the source QEMU over QMP, the destination host-plugin over a control
//! channel through the gateways (`Inquire`), and then:
//!
//! | source     | destination        | action                                            |
//! |------------|--------------------|---------------------------------------------------|
//! | running    | anything           | the destination is told to discard its copy       |
//! | paused     | running            | the source is quit (or left paused: `--keep-source`) |
//! | paused     | paused / absent    | the destination discards its copy; once it is sure, the source resumes |
//! | paused     | busy               | nothing: a session is still deciding; ask again   |
//!
//! The destination's copy is resumed only by its own session after a `Commit`; resolve never
//! starts it, so resolve never needs the destination's word that the source is stopped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_api::control::{IncomingState, ToDestination, ToSource};
use serde::Serialize;

use crate::control::Channel;
use crate::gateway_api::{open_control, ControlRoute, GatewayApi, GatewayEndpoint};
use crate::migrate::{connect_source, vm_name};

/// How long the destination may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `ferry-host resolve` was asked.
#[derive(Clone, Debug)]
pub struct ResolveOptions {
    /// The source VM's QMP socket.
    pub qmp: PathBuf,
    /// Destination site.
    pub to: String,
    /// The destination host-plugin, as the destination gateway reaches it.
    pub dest: SocketAddr,
    /// The local gateway's API.
    pub gateway: GatewayEndpoint,
    /// VM name (default: QEMU's `-name`).
    pub name: Option<String>,
    /// Leave the source paused (instead of quitting it) when the VM runs at the destination.
    pub keep_source: bool,
}

/// Where the VM runs after `resolve`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// At the source (it ran already, or was resumed).
    Source,
    /// At the destination (the source was quit or left paused).
    Destination,
    /// Not decided: the destination has a session under way for the VM.
    Undecided,
}

/// What resolve found and did (printed as JSON).
#[derive(Clone, Debug, Serialize)]
pub struct ResolveReport {
    /// The VM.
    pub vm: String,
    /// The source VM's run state as found.
    pub source_found: String,
    /// The destination's VM as found.
    pub destination_found: IncomingState,
    /// Where the VM runs now.
    pub resolution: Resolution,
    /// What was done.
    pub actions: Vec<String>,
}

/// Runs `ferry-host resolve`.
pub async fn resolve(o: ResolveOptions) -> anyhow::Result<ResolveReport> {
    let qmp = connect_source(&o.qmp).await?;
    let vm = vm_name(&qmp, o.name.as_deref()).await?;
    let source = qmp.query_status().await.context("query-status on the source")?;

    let mut api = GatewayApi::connect(&o.gateway).await?;
    let ControlRoute { tcp, .. } = open_control(&mut api, &o.to, o.dest).await?;
    let mut control: Channel<ToSource, ToDestination> = Channel::new(tcp);
    control.send(&ToDestination::Inquire { vm: vm.clone() }).await?;
    let found = match control.recv(ANSWER_TIMEOUT).await? {
        ToSource::VmState { state, .. } => state,
        other => bail!("unexpected answer from the destination: {other:?}"),
    };
    let mut report = ResolveReport {
        vm: vm.clone(),
        source_found: source.status.as_str().to_owned(),
        destination_found: found,
        resolution: Resolution::Undecided,
        actions: Vec::new(),
    };
    tracing::info!(%vm, source = %report.source_found, destination = ?found, "found");

    if found == IncomingState::Busy {
        report.actions.push("none: the destination has a migration session for this VM under way; ask again".into());
        return Ok(report);
    }
    if found == IncomingState::Running && !source.running {
        if o.keep_source {
            report.actions.push("left the source paused".into());
        } else {
            qmp.quit().await.context("quit the source VM")?;
            report.actions.push("quit the source VM".into());
        }
        report.resolution = Resolution::Destination;
        return Ok(report);
    }
    if found == IncomingState::Running {
        // Both run: nothing Ferry does leads here; stop the copy that did not take over.
        bail!("the VM runs at both sites; Ferry never resumes both: stop one by hand (the destination's started last)");
    }
    // The source's copy is the one to keep: make sure the destination's never runs.
    control.send(&ToDestination::Discard { vm: vm.clone() }).await?;
    match control.recv(ANSWER_TIMEOUT).await? {
        ToSource::Discarded { vm_discarded: true, detail, .. } => report.actions.push(format!("destination: {detail}")),
        ToSource::Discarded { detail, .. } => {
            bail!("the destination could not make sure its copy is gone ({detail}); the source stays {}", report.source_found)
        }
        other => bail!("unexpected answer from the destination: {other:?}"),
    }
    if !source.running {
        qmp.cont().await.context("cont on the source")?;
        report.actions.push("resumed the source VM".into());
    }
    report.resolution = Resolution::Source;
    Ok(report)
}
