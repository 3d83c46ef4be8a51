//! Errors of the QMP client.
//!
//! Every error names what was being done (the command, or the handshake step) so a log line
//! is enough to tell which QMP exchange failed and why.

use std::time::Duration;

/// Result alias of the QMP client.
pub type Result<T, E = QmpError> = std::result::Result<T, E>;

/// What can go wrong talking QMP to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered a command with an error object.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// No reply (or greeting) within the configured time.
    #[error("QMP `{command}`: no reply within {timeout:?}")]
    Timeout {
        /// The command (or `greeting` / `connect`).
        command: String,
        /// The limit that ran out.
        timeout: Duration,
    },
    /// The connection closed (or broke) before the reply arrived, or was already closed.
    #[error("QMP connection lost{}: {reason}", command.as_deref().map(|c| format!(" during `{c}`")).unwrap_or_default())]
    ConnectionLost {
        /// The command in flight, if any.
        command: Option<String>,
        /// Why the connection ended (EOF, I/O error, oversized line, ...).
        reason: String,
    },
    /// QEMU sent a line longer than the configured limit; the connection is dropped.
    #[error("QMP line longer than {limit} bytes")]
    LineTooLong {
        /// The limit, in bytes.
        limit: usize,
    },
    /// QEMU's reply did not have the shape this client expects for the command.
    #[error("QMP `{command}`: unexpected reply shape: {source}")]
    Decode {
        /// The command whose reply was malformed.
        command: String,
        /// The serde error (names the missing or unexpected field).
        #[source]
        source: serde_json::Error,
    },
    /// The peer broke the protocol (bad greeting, a message that is neither a reply nor an
    /// event where one was required, bad value).
    #[error("QMP protocol error during {context}: {detail}")]
    Protocol {
        /// What was being done.
        context: String,
        /// What was wrong.
        detail: String,
    },
}

impl QmpError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        QmpError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn protocol(context: impl Into<String>, detail: impl Into<String>) -> Self {
        QmpError::Protocol {
            context: context.into(),
            detail: detail.into(),
        }
    }

    /// QEMU's error class if this is a [`QmpError::Command`].
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True if the connection is gone (no further command can succeed).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, QmpError::ConnectionLost { .. })
    }
}
