//! The fleet policy at the agent: persisted in the data directory, so that a
//! restart without an uplink keeps enforcing it, and handed to the outbox
//! writer (which applies it before anything is stored for upload) and the
//! uplink (which applies its stateless part again to what waits from before
//! a change, so denied data never crosses the wire).
//!
//! The labels its rules are selected by are the hub's: the hub tells the
//! agent the labels its registry holds (`Labels`, protocol version 4), and
//! they replace the `[agent] labels` of the config from then on, here, in
//! the `Hello` and in the outbox's buffer limits, so that both ends select
//! the same rules. They are kept beside the policy for the next start.
//!
//! What the hub sends is not the fleet's document but this agent's part of
//! it (`Policy::scoped_text`): the rules that select it, and for each that
//! hashes the key the hub derived for that rule. The hub's own key never
//! reaches an agent.
//!
//! ```text
//! <data_dir>/policy.json   {"version": N, "text": "<the agent's part, TOML>"}
//!                          written to policy.json.tmp, fsynced, renamed;
//!                          mode 0600 whatever the umask
//! <data_dir>/labels.json   {"site": "...", ...}: the hub's labels, the same way
//! ```
//!
//! Why 0600: the text holds the keys of the rules that hash this agent's
//! data, and the agent's user is the only reader it needs. A file left
//! wider by an older agent is narrowed when it is opened. What the agent
//! shows (`policy show`, [`AgentPolicy::text`]) has the keys redacted.
//!
//! A file or push from before the key moved to the hub (the fleet's whole
//! document, with its `[hashing] key`) is still enforced, with its hashed
//! fields redacted instead (no key is used that every gateway held), and
//! is saved again at once without its key; the hub sends this agent's part
//! at its next connection.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocols::policy::{
    digest, redact_keys, Catalog, Compiled, Policy, PolicyError, PolicyVersion,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The file name inside the data directory.
pub const FILE_NAME: &str = "policy.json";

/// The file of the hub's labels inside the data directory.
pub const LABELS_FILE_NAME: &str = "labels.json";

/// The policy in force at this agent, compiled for its labels.
#[derive(Debug)]
pub struct AgentPolicy {
    /// The version (0: none).
    pub version: PolicyVersion,
    /// The document as the hub sent it, with its keys redacted: what may
    /// be shown.
    pub text: String,
    /// The SHA-256 of the document as saved, keys included: a push of the
    /// same document is not written again.
    saved_digest: String,
    /// The parsed document.
    pub policy: Policy,
    /// Its rules for this agent's labels.
    pub compiled: Arc<Compiled>,
    /// The labels it was compiled for.
    pub labels: BTreeMap<String, String>,
}

impl AgentPolicy {
    /// No policy: everything allowed.
    pub fn none(labels: &BTreeMap<String, String>) -> AgentPolicy {
        let policy = Policy::default();
        let compiled = Arc::new(policy.compile(labels, &Catalog::trusting()));
        AgentPolicy {
            version: PolicyVersion(0),
            text: String::new(),
            saved_digest: String::new(),
            policy,
            compiled,
            labels: labels.clone(),
        }
    }

    /// Whether it can change any event: without rules and with the default
    /// allow, the uplink need not look at what it sends.
    pub fn is_permissive(&self) -> bool {
        self.version.0 == 0
            || (self.compiled.rules() == 0
                && self.policy.default_action == outpost_protocols::policy::Action::Allow
                && !self.policy.default_sinks.is_empty())
    }

    /// Parses a document from the hub (pushed, or read back from the
    /// file), and says what to save: the document itself, or, for one of
    /// before the key moved to the hub, the same with its key redacted.
    fn parse(
        version: u64,
        text: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(AgentPolicy, String), PolicyError> {
        // The hub validated the sinks and residency against its own catalog;
        // the agent checks the language and compiles its rules.
        let (policy, saved) = match Policy::parse_scoped(text) {
            Ok(p) => (p, text.to_owned()),
            Err(PolicyError::KeyInPolicy { .. }) => (
                Policy::parse_stored(text, &Catalog::trusting())?,
                redact_keys(text),
            ),
            Err(e) => return Err(e),
        };
        let compiled = Arc::new(policy.compile(labels, &Catalog::trusting()));
        let p = AgentPolicy {
            version: PolicyVersion(version),
            text: redact_keys(&saved),
            saved_digest: digest(&saved),
            policy,
            compiled,
            labels: labels.clone(),
        };
        Ok((p, saved))
    }
}

/// Why the persisted policy could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyFileError {
    /// The file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        message: String,
    },
    /// The file is not what this agent writes.
    #[error("{path}: not a policy file: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The document in it does not parse (a newer language?).
    #[error("{path}: policy version {version}: {error}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u64,
        /// Why.
        error: PolicyError,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u64,
    text: String,
}

/// The policy state of a running agent: what is in force, published to the
/// writer and the uplink.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    path: PathBuf,
    labels_path: PathBuf,
    tx: Arc<watch::Sender<Arc<AgentPolicy>>>,
}

impl PolicyStore {
    /// Loads `<data_dir>/policy.json` (none: no policy yet), compiled for
    /// the hub's labels in `<data_dir>/labels.json`, or for `configured`
    /// (the config's `[agent] labels`) until the hub has told it any.
    pub fn open(
        data_dir: &Path,
        configured: &BTreeMap<String, String>,
    ) -> Result<PolicyStore, PolicyFileError> {
        let labels_path = data_dir.join(LABELS_FILE_NAME);
        let hubs = match std::fs::read_to_string(&labels_path) {
            Ok(text) => Some(
                serde_json::from_str::<BTreeMap<String, String>>(&text).map_err(|e| {
                    PolicyFileError::Corrupt {
                        path: labels_path.clone(),
                        message: e.to_string(),
                    }
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(PolicyFileError::Io {
                    path: labels_path,
                    message: e.to_string(),
                })
            }
        };
        let labels = hubs.as_ref().unwrap_or(configured);
        let path = data_dir.join(FILE_NAME);
        narrow_mode(&path).map_err(|e| PolicyFileError::Io {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let current = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let d: OnDisk =
                    serde_json::from_str(&text).map_err(|e| PolicyFileError::Corrupt {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                let (p, saved) =
                    AgentPolicy::parse(d.version, &d.text, labels).map_err(|error| {
                        PolicyFileError::Invalid {
                            path: path.clone(),
                            version: d.version,
                            error,
                        }
                    })?;
                if saved != d.text {
                    // An older file with the fleet's key: the key goes now.
                    persist(&path, d.version, &saved)?;
                }
                p
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentPolicy::none(labels),
            Err(e) => {
                return Err(PolicyFileError::Io {
                    path,
                    message: e.to_string(),
                })
            }
        };
        let (tx, _) = watch::channel(Arc::new(current));
        Ok(PolicyStore {
            path,
            labels_path,
            tx: Arc::new(tx),
        })
    }

    /// The labels the policy in force is selected by (the hub's, once it
    /// told them), which the agent states in its `Hello`.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.current().labels.clone()
    }

    /// Puts the labels the hub told in force: persists them, then compiles
    /// the policy in force for them. Returns whether they changed anything.
    /// On error nothing changes.
    pub fn set_labels(&self, labels: BTreeMap<String, String>) -> Result<bool, PolicyFileError> {
        let current = self.current();
        if current.labels == labels {
            return Ok(false);
        }
        let body = serde_json::to_vec(&labels).map_err(|e| PolicyFileError::Corrupt {
            path: self.labels_path.clone(),
            message: e.to_string(),
        })?;
        write_durably(&self.labels_path, &body)?;
        let compiled = Arc::new(current.policy.compile(&labels, &Catalog::trusting()));
        self.tx.send_replace(Arc::new(AgentPolicy {
            version: current.version,
            text: current.text.clone(),
            saved_digest: current.saved_digest.clone(),
            policy: current.policy.clone(),
            compiled,
            labels,
        }));
        Ok(true)
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<AgentPolicy> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every policy put in force.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AgentPolicy>> {
        self.tx.subscribe()
    }

    /// Validates a pushed policy, persists it, then puts it in force. On any
    /// error the policy in force stays as it was.
    /// The hub pushes this agent's part at every connection; the same
    /// document again is put in force without writing the file.
    pub fn install(&self, version: u64, text: &str) -> Result<Arc<AgentPolicy>, String> {
        let labels = self.labels();
        let (new, saved) = AgentPolicy::parse(version, text, &labels).map_err(|e| e.to_string())?;
        let current = self.current();
        if current.version != new.version || current.saved_digest != new.saved_digest {
            persist(&self.path, version, &saved).map_err(|e| e.to_string())?;
        }
        let new = Arc::new(new);
        self.tx.send_replace(new.clone());
        Ok(new)
    }
}

/// Saves version `version`'s document to the policy file at `path`.
fn persist(path: &Path, version: u64, text: &str) -> Result<(), PolicyFileError> {
    let body = serde_json::to_vec(&OnDisk {
        version,
        text: text.to_owned(),
    })
    .map_err(|e| PolicyFileError::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    write_durably(path, &body)
}

/// Writes `body` to `path` so that a crash leaves the old file or the new
/// one: to `<path>.tmp` (made afresh with mode 0600 whatever the umask),
/// fsynced, renamed, and the folder flushed.
fn write_durably(path: &Path, body: &[u8]) -> Result<(), PolicyFileError> {
    let io = |e: std::io::Error| PolicyFileError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover of a crash may have another mode: start afresh, so the
    // file is created with 0600 below.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    // The umask only clears bits; 0600 is what the file must have, so say
    // it once more in case the umask cleared the owner's.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(body).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename is durable once the directory is flushed.
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Sets an existing file at `path` that group or others may read to 0600;
/// nothing if there is no file.
fn narrow_mode(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_installed_policy_survives_a_restart_and_a_bad_one_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let labels = BTreeMap::from([("site".to_owned(), "a".to_owned())]);
        let store = PolicyStore::open(dir.path(), &labels).expect("opens");
        assert_eq!(store.current().version, PolicyVersion(0));
        let text = "[[rules]]\nstreams = [\"x/#\"]\naction = \"deny\"\n";
        store.install(3, text).expect("installs");
        assert!(store.install(4, "rules = [").is_err());
        assert_eq!(store.current().version, PolicyVersion(3));
        let again = PolicyStore::open(dir.path(), &labels).expect("reopens");
        assert_eq!(again.current().version, PolicyVersion(3));
        assert_eq!(again.current().compiled.rule_for("x/y"), Some("rules[0]"));
        std::fs::write(dir.path().join(FILE_NAME), "{").expect("damages");
        assert!(matches!(
            PolicyStore::open(dir.path(), &labels),
            Err(PolicyFileError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_policy_file_is_0600_and_an_older_wider_one_is_narrowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let labels = BTreeMap::new();
        let path = dir.path().join(FILE_NAME);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        // A leftover temporary file with a wide mode is not reused as it is.
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, "x").expect("leftover");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let store = PolicyStore::open(dir.path(), &labels).expect("opens");
        store.install(1, "").expect("installs");
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        PolicyStore::open(dir.path(), &labels).expect("reopens");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn the_hubs_labels_select_the_rules_and_outlive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let configured = BTreeMap::from([("site".to_owned(), "a".to_owned())]);
        let store = PolicyStore::open(dir.path(), &configured).expect("opens");
        let text = "[[rules]]\nstreams = [\"x/#\"]\naction = \"deny\"\nagents = { site = \"b\" }\n";
        store.install(1, text).expect("installs");
        assert_eq!(store.current().compiled.rule_for("x/y"), None);
        let hubs = BTreeMap::from([("site".to_owned(), "b".to_owned())]);
        assert!(store.set_labels(hubs.clone()).expect("persists"));
        assert!(!store.set_labels(hubs.clone()).expect("same"));
        assert_eq!(store.labels(), hubs);
        assert_eq!(store.current().compiled.rule_for("x/y"), Some("rules[0]"));
        // A policy installed later is compiled for the hub's labels too.
        store.install(2, text).expect("installs");
        assert_eq!(store.current().compiled.rule_for("x/y"), Some("rules[0]"));
        // After a restart the hub's labels win over the config's.
        let again = PolicyStore::open(dir.path(), &configured).expect("reopens");
        assert_eq!(again.labels(), hubs);
        assert_eq!(again.current().compiled.rule_for("x/y"), Some("rules[0]"));
        std::fs::write(dir.path().join(LABELS_FILE_NAME), "[").expect("damages");
        assert!(matches!(
            PolicyStore::open(dir.path(), &configured),
            Err(PolicyFileError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_shown_text_has_no_key_and_an_older_files_key_is_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let labels = BTreeMap::new();
        let key = "ab".repeat(32);
        let scoped = format!(
            "[[rules]]\nname = \"ids\"\nstreams = [\"hr/#\"]\nhash = [\"/id\"]\nhash_key = \"{key}\"\n"
        );
        let store = PolicyStore::open(dir.path(), &labels).expect("opens");
        let p = store.install(2, &scoped).expect("installs");
        assert!(!p.text.contains(&key), "{}", p.text);
        assert!(!format!("{p:?}").contains(&key));
        // The same push again is not written again.
        let path = dir.path().join(FILE_NAME);
        std::fs::remove_file(&path).expect("removes");
        store.install(2, &scoped).expect("installs");
        assert!(!path.exists());
        // A file of before: the fleet's whole document with its key.
        let old = "[hashing]\nkey = \"the-fleet-key-every-gateway-had\"\n[[rules]]\nstreams = [\"hr/#\"]\nhash = [\"/id\"]\n";
        let body = serde_json::to_vec(&OnDisk {
            version: 1,
            text: old.to_owned(),
        })
        .expect("json");
        std::fs::write(&path, body).expect("writes");
        let again = PolicyStore::open(dir.path(), &labels).expect("opens an older file");
        assert_eq!(again.current().version, PolicyVersion(1));
        assert_eq!(again.current().compiled.rules(), 1);
        let saved = std::fs::read_to_string(&path).expect("reads");
        assert!(!saved.contains("the-fleet-key"), "{saved}");
        assert!(!again.current().text.contains("the-fleet-key"));
        PolicyStore::open(dir.path(), &labels).expect("the scrubbed file opens");
    }
}
