//! The migration lifecycles as sans-IO state machines: no tokio, no QMP or socket I/O, time
//! passed in, like [`crate::convergence`].
//!
//! - [`source`]: `ferry-host migrate`, from `migrate` to the source VM quit (or kept paused),
//!   with the rules for when the source VM may run again.
//! - [`destination`]: one `ferry-host serve` control session, from `Prepare` to the VM
//!   running here and its MACs announced.
//!
//! The async shells ([`crate::migrate`], [`crate::serve`]) do the I/O, feed what they observe
//! into a machine (`handle_*`) and carry out the actions it queues (`poll_action`).
//!
//! The rule both sides exist for: the VM never runs twice. The destination runs the VM only on
//! the source's `Commit`, which the source sends once QEMU completed; before that any failure
//! cancels and the source VM keeps running, and the destination discards its paused copy. After
//! it the source resumes only when the destination said it discarded its VM; when the
//! destination goes silent both may stay paused, and `ferry-host resolve` starts exactly one.

pub mod destination;
pub mod source;

use std::fmt;

use serde::{Serialize, Serializer};

use crate::control::ChannelError;

/// How a migration ended (`outcome` in the report: `completed` or `failed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// The VM runs at the destination.
    Completed,
    /// The migration was given up (the report's `error` says why).
    #[default]
    Failed,
}

impl Outcome {
    /// The report's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// What the source VM is after the command (`source_vm` in the report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SourceVm {
    /// It runs (nothing was changed, or it was resumed after a failure): `running`.
    #[default]
    Running,
    /// Left paused while the VM runs at the destination (`--keep-source`, or `quit` failed):
    /// `paused`.
    Paused,
    /// Quit after the destination ran the VM: `quit`.
    Quit,
    /// Left paused because the destination went silent after the source completed: it might
    /// run the VM, so resuming here could make two running copies.
    PausedDestinationUnknown,
    /// Resuming it failed: `<run state> (cont failed: <error>)`.
    ResumeFailed {
        /// QEMU's run state, as QEMU spells it.
        state: String,
        /// Why `cont` failed.
        error: String,
    },
    /// Its state could not be read: `unknown (<error>)`.
    Unknown {
        /// Why `query-status` failed.
        error: String,
    },
}

impl fmt::Display for SourceVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceVm::Running => f.write_str("running"),
            SourceVm::Paused => f.write_str("paused"),
            SourceVm::Quit => f.write_str("quit"),
            SourceVm::PausedDestinationUnknown => {
                f.write_str("paused (destination state unknown: run `ferry-host resolve` with the same options to start exactly one)")
            }
            SourceVm::ResumeFailed { state, error } => write!(f, "{state} (cont failed: {error})"),
            SourceVm::Unknown { error } => write!(f, "unknown ({error})"),
        }
    }
}

impl Serialize for SourceVm {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A signal asking the command to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

/// What happened on the control channel.
#[derive(Debug)]
pub enum ControlEvent<M> {
    /// A message arrived.
    Message(M),
    /// The channel closed, failed, or nothing arrived in time.
    Lost(ChannelError),
}

impl<M> From<Result<M, ChannelError>> for ControlEvent<M> {
    fn from(received: Result<M, ChannelError>) -> Self {
        match received {
            Ok(m) => ControlEvent::Message(m),
            Err(e) => ControlEvent::Lost(e),
        }
    }
}

/// `error` and its sources, `: `-separated (as `anyhow` shows an error with `{:#}`), so that a
/// failure reads the same whether it was raised in a shell or decided here.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text += &format!(": {e}");
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_spellings_are_unchanged() {
        assert_eq!(serde_json::to_value(Outcome::Completed).unwrap(), "completed");
        assert_eq!(serde_json::to_value(Outcome::Failed).unwrap(), "failed");
        let cases = [
            (SourceVm::Running, "running"),
            (SourceVm::Paused, "paused"),
            (SourceVm::Quit, "quit"),
            (
                SourceVm::PausedDestinationUnknown,
                "paused (destination state unknown: run `ferry-host resolve` with the same options to start exactly one)",
            ),
            (SourceVm::ResumeFailed { state: "paused".into(), error: "boom".into() }, "paused (cont failed: boom)"),
            (SourceVm::Unknown { error: "gone".into() }, "unknown (gone)"),
        ];
        for (state, text) in cases {
            assert_eq!(serde_json::to_value(&state).unwrap(), text);
            assert_eq!(state.to_string(), text);
        }
    }
}
