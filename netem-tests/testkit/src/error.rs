//! The kit's error type.

use std::path::PathBuf;

/// Why a kit helper failed.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// A file or directory operation failed.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// What was being done (e.g. "writing").
        what: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Generating the certificates failed.
    #[error("generating certificates in {}: {message}", dir.display())]
    Certificates {
        /// The PKI directory.
        dir: PathBuf,
        /// The generator's error.
        message: String,
    },
    /// The gateway rejected a configuration the kit wrote.
    #[error("loading gateway config {}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// The parser's error.
        message: String,
    },
}
