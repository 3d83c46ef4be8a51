//! Running the external tools (`ip`, `tc`) the harness relies on, with their
//! stderr turned into readable errors.

use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Renders a command line for logs and errors.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; returns its stdout, or an error carrying stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    tracing::debug!(command = %line, "running");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| Error::Command {
            command: line.clone(),
            status: format!("could not start: {e}"),
            stderr: String::new(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs `program args...`.
pub(crate) fn run_args<S: AsRef<str>>(program: &str, args: &[S]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args.iter().map(|a| a.as_ref()));
    run(&mut cmd)
}
