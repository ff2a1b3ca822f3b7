//! The trainer's error type: its own failures (a refused setting, a file it could not
//! read or write, a checkpoint that failed a check) and, wrapped as they are, the
//! communicator's.

/// Result alias used across the trainer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting (flag, TOML key) was refused.
    #[error("invalid value {value:?} for {var}: accepted values are {accepted}")]
    Config {
        /// The setting's name, e.g. `seq_len`.
        var: String,
        /// The value that was given.
        value: String,
        /// What would have been accepted.
        accepted: String,
    },

    /// A call was given arguments that cannot work (shapes, sizes, file contents).
    #[error("invalid argument to {op}: {reason}")]
    InvalidArgument {
        /// The call.
        op: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint file was refused (which check failed is in `reason`).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// The failed check, e.g. "checksum mismatch" or "truncated".
        reason: String,
    },

    /// A Hugging Face model directory's file was refused, or could not be written (which
    /// tensor or setting, and what would be accepted, is in `reason`).
    #[error("Hugging Face model {path}: {reason}")]
    HfModel {
        /// The file: `config.json` or `model.safetensors` of the directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The gradient exchange failed: hetccl's error as the communicator (or the thread
    /// group standing in for one) gave it.
    #[error(transparent)]
    Comm(#[from] hetccl::Error),
}

impl Error {
    /// Wraps an `io::Error` with a description of what was being attempted.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            reason: reason.into(),
        }
    }
}
