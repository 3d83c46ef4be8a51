//! Error type of the `ferry_netem` library.

use std::io;

/// Errors from building, running or tearing down an emulated WAN.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operation needs root (network namespaces, TUN devices, `tc`).
    #[error("this needs root (euid 0): network namespaces and TUN devices are privileged")]
    NotRoot,
    /// The configuration is inconsistent or out of range.
    #[error("invalid WAN configuration: {0}")]
    InvalidConfig(String),
    /// An external command (`ip`, `tc`) could not be run or failed.
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for humans.
        command: String,
        /// Exit status or spawn failure.
        status: String,
        /// What the command printed on stderr (trimmed).
        stderr: String,
    },
    /// The kernel lacks `sch_netem`, but the netem backend was requested.
    #[error("the kernel has no usable `tc qdisc netem` (sch_netem missing?): {0}")]
    NetemUnavailable(String),
    /// A named resource already exists and is not ours to reuse.
    #[error("{0} already exists (leftover? run `ferry-netem down --name ...`)")]
    AlreadyExists(String),
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Wraps an [`io::Error`] with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
