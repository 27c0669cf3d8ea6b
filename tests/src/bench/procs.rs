//! Starting the measured binaries from an explicit folder.
//!
//! `outpost_tests::{Agent, Devsim, Hub}::start` find the binaries through
//! `OUTPOST_BIN_DIR`, which this harness cannot set for itself (setting an
//! environment variable in a running process is banned in clippy.toml). Such
//! variables should not reach the agent either: it reads `OUTPOST_*`
//! variables as config overrides, and agent builds before the shared
//! `protocols::settings` parser turned an inherited `OUTPOST_BIN_DIR` into the
//! unknown key `bin_dir` and refused to start. So the harness spawns the
//! binaries itself, with every `OUTPOST_*` variable removed (the measured agent
//! and hub run on their config files alone), and wraps them in the helpers'
//! types so that they are killed on drop all the same.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use outpost_agent::outbox::OutboxReader;
use outpost_protocols::AgentId;
use outpost_tests::{free_udp_port, Agent, Devsim, Hub, Pki, Proc};

/// The binaries under test.
#[derive(Debug, Clone)]
pub(crate) struct Bins {
    pub(crate) agent: PathBuf,
    pub(crate) devsim: PathBuf,
    /// `outpost-hub`, if `dir` has one (an agent-only build, such as the
    /// static musl one, has not; the caller may point this elsewhere).
    pub(crate) hub: Option<PathBuf>,
}

impl Bins {
    /// The binaries in `dir`; fails with a hint if one is missing.
    pub(crate) fn in_dir(dir: &Path) -> Result<Bins> {
        let find = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if !p.exists() {
                bail!(
                    "{} not found: run `cargo build --release --bins` first, or pass --bin-dir",
                    p.display()
                );
            }
            Ok(p)
        };
        Ok(Bins {
            agent: find("outpost-agent")?,
            devsim: find("outpost-devsim")?,
            hub: Some(dir.join("outpost-hub")).filter(|p| p.exists()),
        })
    }

    /// The same binaries with `agent` as the agent (the memory rows measure
    /// the static musl agent that `cross/build` makes).
    pub(crate) fn with_agent(&self, agent: PathBuf) -> Bins {
        Bins {
            agent,
            ..self.clone()
        }
    }

    /// The hub binary, or an error with a hint.
    pub(crate) fn hub(&self) -> Result<&Path> {
        self.hub.as_deref().with_context(|| {
            format!(
                "outpost-hub not found beside {}: run `cargo build --release --bins` first",
                self.agent.display()
            )
        })
    }

    /// A fleet PKI in `dir` made by this hub's `ca` verbs.
    pub(crate) fn pki(&self, dir: &Path) -> Result<Pki> {
        Pki::with_hub(dir, self.hub()?)
    }

    /// Writes `dir/hub.toml` (store in `dir/hub-data`, see [`hub_db`]; the
    /// certificates in `creds`, as [`Pki`] makes them; a free UDP port of
    /// 127.0.0.1; everything else the defaults, `synchronous = "full"` among
    /// them) and runs the hub on it until it says it listens. Its log goes
    /// to `dir/hub.log`.
    pub(crate) fn start_hub(&self, dir: &Path, creds: &Path) -> Result<Hub> {
        self.start_hub_with(dir, creds, "")
    }

    /// [`Bins::start_hub`] with `tables` (`[[sinks]]` entries, say) at the
    /// end of the config. The simulated fleets dial from 127.0.0.1 alone,
    /// where a real fleet dials from as many addresses as it has gateways,
    /// so the per-address limit is off ([`Bins::start_hub_keys`] keeps it).
    pub(crate) fn start_hub_with(&self, dir: &Path, creds: &Path, tables: &str) -> Result<Hub> {
        self.start_hub_keys(dir, creds, "per_address_burst = 0\n", tables)
    }

    /// [`Bins::start_hub_with`] with `hub_keys` in `[hub]` and nothing else
    /// changed from the defaults.
    pub(crate) fn start_hub_keys(
        &self,
        dir: &Path,
        creds: &Path,
        hub_keys: &str,
        tables: &str,
    ) -> Result<Hub> {
        std::fs::create_dir_all(dir)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "[hub]\ndata_dir = \"hub-data\"\nlisten = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{hub_keys}\n{tables}",
                creds.join("ca.pem").display(),
                creds.join("hub.pem").display(),
                creds.join("hub.key").display(),
            ),
        )?;
        let log_path = dir.join("hub.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let listening = || {
            std::fs::read_to_string(&log_path)
                .map(|s| s.matches("Hub listening").count())
                .unwrap_or(0)
        };
        let before = listening();
        let child = clean_env(Command::new(self.hub()?))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start outpost-hub")?;
        let mut hub = Hub {
            proc: Proc {
                child,
                name: "outpost-hub".into(),
            },
            config,
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while listening() == before {
            if !hub.proc.is_running() {
                bail!("outpost-hub exited on start:\n{}", hub.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "outpost-hub did not listen within 30 s (log: {})",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(hub)
    }

    /// Runs `outpost-hub ARGS --config <hub's config>` to completion (an
    /// operator verb, which reads the store while the hub runs) and returns
    /// its stdout; fails unless it exits 0.
    pub(crate) fn hub_cli(&self, hub: &Hub, args: &[&str]) -> Result<String> {
        let out = clean_env(Command::new(self.hub()?))
            .args(args)
            .arg("--config")
            .arg(&hub.config)
            .output()
            .context("run outpost-hub")?;
        if !out.status.success() {
            bail!(
                "outpost-hub {} exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `config` to `dir/agent.toml` and runs the agent on it; its log
    /// goes to `dir/agent.log`. The agent's outbox is `dir/data/outbox.db` if
    /// the config's `data_dir` is `dir/data`, which [`outbox_reader`] expects.
    pub(crate) fn start_agent(&self, dir: &Path, config: &str) -> Result<Agent> {
        let path = dir.join("agent.toml");
        std::fs::write(&path, config)?;
        // Appended, so that a restarted agent keeps its earlier log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))?;
        let child = clean_env(Command::new(&self.agent))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.agent.display()))?;
        Ok(Agent {
            proc: Proc {
                child,
                name: "outpost-agent".into(),
            },
            config: path,
        })
    }

    /// Runs `outpost-devsim --listen 127.0.0.1:0 --counters N` and reads the
    /// address it bound.
    pub(crate) fn start_devsim(&self, counters: usize) -> Result<Devsim> {
        let mut child = clean_env(Command::new(&self.devsim))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--counters")
            .arg(counters.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", self.devsim.display()))?;
        let stdout = child.stdout.take().context("devsim stdout")?;
        // Wrapped before reading, so that it is killed if the read fails.
        let proc = Proc {
            child,
            name: "outpost-devsim".into(),
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening ")
            .with_context(|| format!("outpost-devsim said {line:?}"))?
            .parse()?;
        Ok(Devsim { proc, addr })
    }
}

/// The store file of a hub started by [`Bins::start_hub`].
pub(crate) fn hub_db(hub: &Hub) -> PathBuf {
    hub.config.with_file_name("hub-data").join("hub.db")
}

/// Removes every `OUTPOST_*` variable from a child's environment.
fn clean_env(mut cmd: Command) -> Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OUTPOST_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Opens the running agent's outbox (`<home>/data/outbox.db`) read-only once
/// the agent has created it: the file appears a moment before its schema, so
/// the open is retried until it succeeds.
pub(crate) fn outbox_reader(home: &Path, agent: &mut Agent) -> Result<OutboxReader> {
    let db = home.join("data").join("outbox.db");
    let log = home.join("agent.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !agent.proc.is_running() {
            bail!("the agent exited (log: {})", log.display());
        }
        let last = match OutboxReader::open(&db, AgentId::parse("local")?) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            bail!(
                "the agent's outbox did not open within 60 s: {last} (log: {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Which build `bin` is, for the rows that name it: "static musl" when the
/// ELF file asks for no program interpreter (`cross/build`'s binaries),
/// "dynamic (glibc)" when it does; the file's path follows.
pub(crate) fn build_name(bin: &Path) -> String {
    let kind = match has_interpreter(bin) {
        Ok(false) => "static musl",
        Ok(true) => "dynamic (glibc)",
        Err(_) => "unknown build",
    };
    format!("{kind}, {}", bin.display())
}

/// Whether the ELF64 file `bin` has a `PT_INTERP` program header.
fn has_interpreter(bin: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let data = std::fs::read(bin)?;
    let u16_at = |at: usize| -> Result<usize> {
        let b = data.get(at..at + 2).context("a short ELF file")?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    if data.get(..5) != Some(&b"\x7fELF\x02"[..]) {
        bail!("{} is not a 64-bit ELF file", bin.display());
    }
    let phoff_bytes = data.get(0x20..0x28).context("a short ELF file")?;
    let phoff = usize::try_from(u64::from_le_bytes(phoff_bytes.try_into()?))?;
    let (size, count) = (u16_at(0x36)?, u16_at(0x38)?);
    for i in 0..count {
        let at = phoff + i * size;
        let t = data.get(at..at + 4).context("a short ELF file")?;
        if u32::from_le_bytes(t.try_into()?) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_named_so() {
        // This test binary is linked dynamically against the system's libc.
        let me = std::env::current_exe().expect("current_exe");
        assert!(
            build_name(&me).starts_with("dynamic"),
            "{}",
            build_name(&me)
        );
    }
}
