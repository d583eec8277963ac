//! Running host programs with errors that say what was run and what it printed.

use std::fmt;
use std::process::{Command, Stdio};

/// A host program that could not be started or did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The program could not be started at all (usually: not installed).
    #[error("cannot run `{line}`: {source}")]
    Spawn {
        /// The command line.
        line: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{line}` failed ({status}){}", stderr_suffix(stderr))]
    Failed {
        /// The command line.
        line: String,
        /// Its exit status, in words.
        status: String,
        /// The last lines it wrote to stderr.
        stderr: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.trim())
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, CommandError>;

/// The command line of `cmd`, for messages.
pub fn line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines.get(lines.len().saturating_sub(n)..).unwrap_or_default().join("\n")
}

/// Runs `cmd` with inherited stdout/stderr, echoing the command line first.
pub fn run_visible(cmd: &mut Command) -> Result<()> {
    let line = line(cmd);
    eprintln!("+ {line}");
    let status = cmd.status().map_err(|source| CommandError::Spawn { line: line.clone(), source })?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandError::Failed { line, status: status.to_string(), stderr: String::new() })
    }
}

/// Runs `cmd` quietly and returns its stdout; a failure carries the tail of its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = line(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn { line: line.clone(), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CommandError::Failed {
            line,
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 8),
        })
    }
}

/// A shell command someone can paste to fix a missing piece, shown in error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixCommand(pub String);

impl fmt::Display for FixCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "    {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_failure() {
        assert_eq!(output(Command::new("echo").arg("hi")).unwrap(), "hi\n");
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c") && msg.contains("oops"), "{msg}");
        let err = output(&mut Command::new("/nonexistent/program")).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }
}
