//! The library's error type and its mapping to the documented exit codes.
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success, also when there was nothing new |
//! | 1 | any other failure (I/O, a source commit that removes data, a corrupt checkpoint, …) |
//! | 2 | usage or configuration error: a bad flag, a missing column, a path that is not a table |
//! | 3 | `status`: there is no checkpoint at that location yet |
//! | 2 | also: the checkpoint and its output tables disagree (refused before writing) |
//! | 75 | another run holds the checkpoint, or took it over from this run (EX_TEMPFAIL) |
//! | 101 | a test failpoint fired (`SESSIONIZER_FAILPOINT`) |

use deltalake::DeltaTableError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The flags, the config, or the tables they point at do not fit together.
    #[error("{0}")]
    Usage(String),
    /// There is no checkpoint at the location (`status` reports it with its own exit code).
    #[error("{0}")]
    NoCheckpoint(String),
    /// Another run holds the checkpoint lock.
    #[error("{0}")]
    Locked(String),
    /// This run lost the checkpoint lock to another run and stopped before its next write.
    #[error("{0}")]
    Fenced(String),
    /// The checkpoint is behind (or foreign to) its output tables; nothing was written.
    #[error("{0}")]
    Disagreement(String),
    /// The events table's history cannot be processed as asked (e.g. a data-removing commit).
    #[error("{0}")]
    Source(String),
    /// The checkpoint is unreadable or belongs to other settings.
    #[error("{0}")]
    Checkpoint(String),
    #[error("Delta: {0}")]
    Delta(#[from] DeltaTableError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("DataFusion: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Disagreement(_) => 2,
            Error::NoCheckpoint(_) => 3,
            Error::Locked(_) | Error::Fenced(_) => 75,
            _ => 1,
        }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
}

impl From<crate::engine::SpecError> for Error {
    fn from(e: crate::engine::SpecError) -> Self {
        Error::Usage(e.to_string())
    }
}
