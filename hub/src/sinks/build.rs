//! Building a sink from its validated entry: the one place that knows
//! every kind.
//!
//! Why methods on [`SinkConfig`] here rather than functions in the sinks'
//! module root: the kinds' modules use what the root gathers (the sink
//! trait, the configs, the TLS loader's types), so a root that called them
//! would be a room its own rooms call back.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::config::{SinkConfig, SinkKind};
use super::sink::{Sink, SinkError};
use super::{http, jetstream, mqtt};

impl SinkConfig {
    /// Builds the sink this entry describes; relative paths in it are
    /// relative to `base` (the config file's folder). Connections are made
    /// in the background and remade when lost: a far end that is
    /// unreachable now is not an error here (the runner retries, and says
    /// so), a setting that cannot work is ([`SinkError::Config`]).
    /// Background tasks end when `stop` is cancelled.
    pub async fn build(
        &self,
        base: &Path,
        stop: CancellationToken,
    ) -> Result<Arc<dyn Sink>, SinkError> {
        match &self.kind {
            SinkKind::Http(t) => http::build(self, t, base, stop).await,
            SinkKind::Mqtt(t) => mqtt::build(self, t, base, stop).await,
            SinkKind::JetStream(t) => jetstream::build(self, t, base, stop).await,
        }
    }

    /// Checks what [`SinkConfig::build`] checks (its files read, its
    /// certificates and keys parsed) without connecting or starting
    /// anything: for a replica that stands by while another runs the sink
    /// (see `runner::start`).
    pub fn check_files(&self, base: &Path) -> Result<(), SinkError> {
        match &self.kind {
            SinkKind::Http(t) => http::check_files(self, t, base),
            SinkKind::Mqtt(t) => mqtt::check_files(self, t, base),
            SinkKind::JetStream(t) => jetstream::check_files(self, t, base),
        }
    }
}
