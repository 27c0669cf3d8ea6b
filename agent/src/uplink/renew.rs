//! The uplink's side of certificate renewal: when the session should ask
//! (two thirds into the certificate's validity, or now on an operator's
//! request), the key and request when it asks, the hub's certificate put in
//! place, and the expiry in sight (the gauge, and a warning once a day from
//! 30 days ahead). The decisions of the protocol stay the session's; the
//! files are `crate::cert`'s.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cert::{self, CertError, CertFiles, Validity};
use crate::clock;
use crate::metrics::Metrics;

/// Warn about a certificate this close to its expiry.
const EXPIRY_WARNING: i64 = 30 * 86_400;

/// How often, at most, the expiry warning is logged.
const WARN_EVERY: i64 = 86_400;

/// The agent's certificate, as the uplink renews it.
#[derive(Debug)]
pub(super) struct Renewer {
    files: CertFiles,
    /// Where an operator's request (`outpost-agent cert renew`) appears.
    data_dir: Option<PathBuf>,
    /// When the expiry warning was last logged, Unix seconds.
    warned: Mutex<Option<i64>>,
}

impl Renewer {
    pub(super) fn new(files: CertFiles, data_dir: Option<&Path>) -> Renewer {
        Renewer {
            files,
            data_dir: data_dir.map(Path::to_owned),
            warned: Mutex::new(None),
        }
    }

    /// Before a connection: finishes a swap a crash cut short.
    pub(super) fn recover(&self) {
        match cert::recover(&self.files) {
            Ok(true) => info!("Finished putting the renewed certificate's key in place."),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "Cannot check for an unfinished certificate swap."),
        }
    }

    /// Whether an operator asked for a renewal.
    pub(super) fn requested(&self) -> bool {
        self.data_dir
            .as_deref()
            .is_some_and(cert::renewal_requested)
    }

    /// When the session should ask for a renewal: now if an operator asked,
    /// else two thirds into the certificate's validity; `None` if the
    /// certificate cannot be read (the next connection fails anyway).
    pub(super) fn due(&self) -> Option<Instant> {
        if self.requested() {
            return Some(clock::now());
        }
        match self.files.validity() {
            Ok(v) => Some(clock::now() + v.renew_in(clock::unix_now())),
            Err(e) => {
                warn!(error = %e, "Cannot read the agent's certificate; no renewal planned.");
                None
            }
        }
    }

    /// Sets the expiry gauge and logs a warning, at most once a day, when the
    /// certificate expires within 30 days.
    pub(super) fn watch_expiry(&self, metrics: &Metrics) {
        let Ok(v) = self.files.validity() else {
            return;
        };
        let now = clock::unix_now();
        let left = v.expires_in(now);
        metrics.cert_expiry_seconds.set(left);
        if left >= EXPIRY_WARNING {
            return;
        }
        let now_s = now.0.div_euclid(1_000_000_000);
        let Ok(mut warned) = self.warned.lock() else {
            return;
        };
        if warned.is_some_and(|w| now_s - w < WARN_EVERY) {
            return;
        }
        *warned = Some(now_s);
        warn!(
            not_after = %time_text(v.not_after),
            days_left = left / 86_400,
            cert = %self.files.cert.display(),
            "The agent's certificate expires within 30 days; it renews over its session when the hub can sign (hub's [hub] ca_dir), otherwise ask for a new one."
        );
    }

    /// A new key (beside the current one) and its signing request.
    pub(super) fn request(&self) -> Result<Vec<u8>, CertError> {
        self.files.make_request()
    }

    /// Puts the hub's certificate and the new key in place, forgets the
    /// operator's request, and says when the new certificate is due.
    pub(super) fn install(&self, cert_pem: &str) -> Result<Instant, CertError> {
        let v: Validity = self.files.install(cert_pem)?;
        if let Some(dir) = &self.data_dir {
            cert::clear_request(dir);
        }
        info!(
            not_after = %time_text(v.not_after),
            cert = %self.files.cert.display(),
            "Certificate renewed; the next connection uses it."
        );
        Ok(clock::now() + v.renew_in(clock::unix_now()))
    }

    /// Forgets an operator's request the hub refused: the session asks
    /// again on its own later.
    pub(super) fn forget_request(&self) {
        if let Some(dir) = &self.data_dir {
            cert::clear_request(dir);
        }
    }

    /// After a refusal or a failure: ask again this much later.
    pub(super) fn retry(&self, after: Duration) -> Instant {
        clock::now() + after
    }
}

fn time_text(unix_s: i64) -> String {
    let secs = u64::try_from(unix_s).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
