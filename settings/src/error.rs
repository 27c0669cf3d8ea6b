//! The one error type of a config file, shared by the agent and the hub so
//! that both print the same one-line message before exiting with status 2.

use std::path::PathBuf;

/// Why a configuration file could not be used; its message is the one line the
/// command-line contract prints before exiting with status 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or has the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A value parsed but breaks a rule.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The key path, such as `modbus.devices[0].tags[3].address`.
        key: String,
        /// What is wrong.
        message: String,
    },
}
