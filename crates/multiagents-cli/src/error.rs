//! The command's own errors: what went wrong, named so that the message
//! says which flag, file or process, and an exit code by kind.

use std::path::PathBuf;
use std::process::ExitCode;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The framework failed: a server unreachable, a store or bus error.
    #[error(transparent)]
    Framework(#[from] multiagents::Error),
    /// A flag's value cannot be used.
    #[error("{flag} {problem}")]
    Usage {
        /// The flag, as typed (`--fail-rate`).
        flag: &'static str,
        /// What is wrong with its value, and what would do.
        problem: String,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A definition file does not parse or is not a valid workflow.
    #[error("{}: {source}", path.display())]
    Definition {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the step or field.
        source: multiagents::core::DefinitionError,
    },
    /// The command refused to act, and did nothing.
    #[error("{0}")]
    Refused(String),
    /// What the command was to act on does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A process or task the command runs failed.
    #[error("{what}: {message}")]
    Process {
        /// Which one.
        what: &'static str,
        /// What happened.
        message: String,
    },
    /// A benchmark's own check failed: what it measured is not what it
    /// should be.
    #[error("{0}")]
    Check(String),
}

impl CliError {
    /// A flag's value cannot be used.
    pub fn usage(flag: &'static str, problem: impl Into<String>) -> Self {
        Self::Usage {
            flag,
            problem: problem.into(),
        }
    }

    /// A process or task the command runs failed.
    pub fn process(what: &'static str, message: impl std::fmt::Display) -> Self {
        Self::Process {
            what,
            message: message.to_string(),
        }
    }

    /// The exit status: 2 for a command line that cannot work (as for
    /// clap's own errors), 1 for everything else.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage { .. } => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// The framework's own error types, each by way of [`multiagents::Error`].
macro_rules! framework_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                Self::Framework(e.into())
            }
        }
    )*};
}

framework_errors!(
    multiagents::bus::BusError,
    multiagents::store::StoreError,
    multiagents::core::DefinitionError,
    multiagents::monitoring::ConfigError
);

/// The command's results.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_culprit_and_usage_exits_2() {
        let e = CliError::usage("--fail-rate", "must be between 0 and 1, not 3");
        assert_eq!(e.to_string(), "--fail-rate must be between 0 and 1, not 3");
        assert_eq!(e.exit_code(), ExitCode::from(2));
        let e = CliError::Read {
            path: "flows/a.yaml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(
            e.to_string().starts_with("cannot read flows/a.yaml: "),
            "{e}"
        );
        assert_eq!(e.exit_code(), ExitCode::FAILURE);
        let bad =
            multiagents::core::WorkflowDefinition::from_json("{").expect_err("not a definition");
        let e = CliError::Definition {
            path: "a.json".into(),
            source: bad,
        };
        assert!(e.to_string().starts_with("a.json: "), "{e}");
    }
}
