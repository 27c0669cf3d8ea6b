//! The hub's trust in an agent, with real hub processes and raw clients
//! built from `protocols` over real QUIC: the registry's labels, not the
//! ones a `Hello` states, select the rules the hub enforces; an operator's
//! label change reaches a live session; a revoked agent's live session is
//! closed within 5 s and it is refused when it comes back, on the SQLite
//! hub and across two JetStream replicas; reinstating lets it in again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_protocols::event::{EventBody, Quality, StreamName, Timestamp, Value};
use outpost_protocols::wire::{ErrorCode, Frame, FrameDecoder, ALPN, SUPPORTED_VERSIONS};
use outpost_protocols::Seq;
use outpost_tests::fleet_sim::client_config;
use outpost_tests::{free_udp_port, wait_until, Hub, Nats, Pki};

/// The contract: a revoked agent's live session is closed within this.
const REVOKE_WITHIN: Duration = Duration::from_secs(5);

/// A raw agent session: hand-made frames over a real mTLS QUIC connection.
struct Raw {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

/// How a raw connection ended, or what came instead.
#[derive(Debug, PartialEq)]
enum Next {
    Frame(Frame),
    Closed(Option<ErrorCode>),
}

impl Raw {
    /// Connects as the agent in `creds` and says `Hello` with `labels`.
    async fn connect(hub: SocketAddr, creds: &Path, labels: &[(&str, &str)]) -> Result<Raw> {
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let conn = endpoint
            .connect_with(client_config(creds, ALPN)?, hub, "127.0.0.1")?
            .await
            .context("handshake")?;
        let (send, recv) = conn.open_bi().await?;
        let mut raw = Raw {
            endpoint,
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(),
        };
        raw.send(&Frame::Hello {
            versions: SUPPORTED_VERSIONS.collect(),
            agent_version: "trust-test".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
        .await?;
        Ok(raw)
    }

    async fn send(&mut self, frame: &Frame) -> Result<()> {
        let mut out = Vec::new();
        frame.encode(&mut out)?;
        self.send.write_all(&out).await?;
        Ok(())
    }

    /// The next frame from the hub, or how the connection ended, within
    /// `within`.
    async fn next(&mut self, within: Duration) -> Result<Next> {
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(Next::Frame(f));
            }
            let read = tokio::time::timeout_at(deadline, self.recv.read(&mut chunk))
                .await
                .context("nothing from the hub in time")?;
            match read {
                Ok(Some(n)) => self.decoder.push(&chunk[..n]),
                Ok(None) | Err(_) => {
                    let reason = tokio::time::timeout_at(deadline, self.conn.closed())
                        .await
                        .context("the stream ended but the connection stayed open")?;
                    return Ok(Next::Closed(close_code(&reason)));
                }
            }
        }
    }

    /// Frames until one matches `want` (skipping heartbeats, acks and the
    /// like), within `within`.
    async fn until(&mut self, within: Duration, want: impl Fn(&Frame) -> bool) -> Result<Frame> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await? {
                Next::Frame(f) if want(&f) => return Ok(f),
                Next::Frame(_) => {}
                Next::Closed(code) => bail!("the hub closed the connection ({code:?})"),
            }
        }
    }

    async fn close(self) {
        self.conn.close(0u32.into(), b"");
        self.endpoint.wait_idle().await;
    }
}

fn close_code(reason: &quinn::ConnectionError) -> Option<ErrorCode> {
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => u32::try_from(c.error_code.into_inner())
            .ok()
            .and_then(ErrorCode::from_u32),
        _ => None,
    }
}

fn site(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("site".to_owned(), name.to_owned())])
}

fn event(stream: &str, n: i64) -> Result<EventBody> {
    Ok(EventBody {
        stream: StreamName::parse(stream)?,
        ts: Timestamp(1_700_000_000_000_000_000 + n),
        value: Value::from_payload(format!("{{\"n\":{n}}}").as_bytes()),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `cli` must succeed; its stdout.
fn ok(what: &str, (code, out, err): (i32, String, String)) -> Result<String> {
    ensure!(code == 0, "{what}: exit {code}: {err}");
    Ok(out)
}

fn streams_stored(hub: &Hub) -> Result<Vec<String>> {
    Ok(hub
        .events_of("#", 100)?
        .iter()
        .filter_map(|e| e["stream"].as_str().map(str::to_owned))
        .collect())
}

#[test]
fn the_registrys_labels_select_the_rules_whatever_the_hello_states() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    let creds = pki.issue_agent("gw-1")?;
    ok(
        "agent label",
        hub.cli(&["agent", "label", "gw-1", "site=plant-a"])?,
    )?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nname = \"plant-a keeps its secrets\"\nagents = { site = \"plant-a\" }\nstreams = [\"secret/#\"]\naction = \"deny\"\n",
    )?;
    ok(
        "policy apply",
        hub.cli(&["policy", "apply", policy.to_str().context("path")?])?,
    )?;
    wait_until(Duration::from_secs(30), "the policy in force", || {
        hub.log().contains("New policy in force")
    })?;

    runtime()?.block_on(async {
        // A gateway of plant-a that claims to be in plant-b, where no rule
        // denies anything.
        let mut raw = Raw::connect(hub.addr, &creds, &[("site", "plant-b")]).await?;
        let welcome = raw
            .until(Duration::from_secs(30), |f| {
                matches!(f, Frame::Welcome { .. })
            })
            .await?;
        println!("{welcome:?}");
        // The hub tells it the registry's labels.
        let told = raw
            .until(Duration::from_secs(30), |f| {
                matches!(f, Frame::Labels { .. })
            })
            .await?;
        assert_eq!(
            told,
            Frame::Labels {
                labels: site("plant-a")
            }
        );
        raw.send(&Frame::Batch {
            events: vec![
                (Seq(1), event("secret/recipe", 1)?),
                (Seq(2), event("public/temp", 2)?),
            ],
        })
        .await?;
        raw.until(
            Duration::from_secs(30),
            |f| matches!(f, Frame::Ack { upto, .. } if *upto == Seq(2)),
        )
        .await?;
        // plant-a's rule was enforced: only the public event is stored.
        assert_eq!(streams_stored(&hub)?, vec!["public/temp".to_owned()]);

        // An operator moves the gateway to plant-b: the live session is
        // told, and plant-a's rule no longer applies to what it sends.
        ok(
            "agent label",
            hub.cli(&["agent", "label", "gw-1", "site=plant-b"])?,
        )?;
        let told = raw
            .until(Duration::from_secs(30), |f| {
                matches!(f, Frame::Labels { .. })
            })
            .await?;
        assert_eq!(
            told,
            Frame::Labels {
                labels: site("plant-b")
            }
        );
        raw.send(&Frame::Batch {
            events: vec![(Seq(3), event("secret/recipe", 3)?)],
        })
        .await?;
        raw.until(
            Duration::from_secs(30),
            |f| matches!(f, Frame::Ack { upto, .. } if *upto == Seq(3)),
        )
        .await?;
        raw.close().await;
        anyhow::Ok(())
    })?;
    assert_eq!(
        streams_stored(&hub)?,
        vec!["public/temp".to_owned(), "secret/recipe".to_owned()]
    );
    let fleet = hub.fleet()?;
    assert_eq!(fleet[0]["labels"]["site"], "plant-b");
    assert_eq!(fleet[0]["labels_ignored"], 1, "{fleet:?}");
    let audit = ok("audit list", hub.cli(&["audit", "list", "--json"])?)?;
    assert_eq!(audit.matches("agent.labels_changed").count(), 2, "{audit}");
    assert!(
        hub.log()
            .contains("states other labels than the registry holds"),
        "{}",
        hub.log()
    );
    Ok(())
}

/// Revokes `id` through `revoker` while `raw` is connected (through another
/// hub, possibly): the session is closed with `revoked` within
/// [`REVOKE_WITHIN`].
async fn revoke_closes_the_live_session(raw: &mut Raw, revoker: &Hub, id: &str) -> Result<()> {
    raw.until(Duration::from_secs(30), |f| {
        matches!(f, Frame::Welcome { .. })
    })
    .await?;
    let started = Instant::now();
    ok(
        "agent revoke",
        revoker.cli(&["agent", "revoke", id, "--reason", "stolen gateway"])?,
    )?;
    let waited = started.elapsed();
    let left = REVOKE_WITHIN.saturating_sub(waited);
    let ended = loop {
        match raw.next(left.max(Duration::from_millis(1))).await {
            Ok(Next::Frame(_)) => {}
            Ok(Next::Closed(code)) => break code,
            Err(e) => bail!(
                "the session was still open {:?} after the revoke: {e}",
                started.elapsed()
            ),
        }
    };
    println!(
        "closed {:?} after the revoke ({waited:?} in the verb)",
        started.elapsed()
    );
    assert_eq!(ended, Some(ErrorCode::Revoked));
    Ok(())
}

/// A connection of a revoked agent is closed with `revoked` right after the
/// handshake, before it can open its stream.
async fn refused_as_revoked(hub: SocketAddr, creds: &Path) -> Result<()> {
    let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let conn = endpoint
        .connect_with(client_config(creds, ALPN)?, hub, "127.0.0.1")?
        .await
        .context("handshake")?;
    let reason = tokio::time::timeout(Duration::from_secs(30), conn.closed())
        .await
        .context("a revoked agent's connection stayed open")?;
    assert_eq!(close_code(&reason), Some(ErrorCode::Revoked), "{reason}");
    endpoint.wait_idle().await;
    Ok(())
}

/// Whether the agent in `creds` is welcomed (not refused) now.
async fn welcomed(hub: SocketAddr, creds: &Path) -> Result<bool> {
    match Raw::connect(hub, creds, &[]).await {
        Ok(mut raw) => {
            let next = raw.next(Duration::from_secs(30)).await?;
            raw.close().await;
            Ok(matches!(next, Next::Frame(Frame::Welcome { .. })))
        }
        Err(e) => {
            println!("not yet: {e:#}");
            Ok(false)
        }
    }
}

#[test]
fn a_revoked_agent_is_cut_off_and_refused_until_reinstated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    let creds = pki.issue_agent("gw-1")?;
    runtime()?.block_on(async {
        let mut raw = Raw::connect(hub.addr, &creds, &[]).await?;
        revoke_closes_the_live_session(&mut raw, &hub, "gw-1").await?;
        refused_as_revoked(hub.addr, &creds).await?;
        anyhow::Ok(())
    })?;
    let fleet = hub.fleet()?;
    assert_eq!(fleet[0]["revoked"]["reason"], "stolen gateway", "{fleet:?}");
    let (_, text, _) = hub.cli(&["fleet", "list"])?;
    assert!(text.contains("revoked"), "{text}");

    ok("agent reinstate", hub.cli(&["agent", "reinstate", "gw-1"])?)?;
    runtime()?.block_on(async {
        // The hub follows within a second or two: retry until welcomed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !welcomed(hub.addr, &creds).await? {
            ensure!(Instant::now() < deadline, "still refused after reinstating");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(())
    })?;
    let audit = ok("audit list", hub.cli(&["audit", "list", "--json"])?)?;
    for action in ["agent.revoked", "agent.reinstated"] {
        assert!(audit.contains(action), "{action} in {audit}");
    }
    assert!(
        hub.log().contains("Refused a revoked agent"),
        "{}",
        hub.log()
    );
    Ok(())
}

/// A replica's config in `dir`, on the JetStream store at `url`.
fn replica(dir: &Path, pki: &Pki, url: &str) -> Result<(PathBuf, SocketAddr)> {
    std::fs::create_dir_all(dir)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\ndata_dir = \"hub-data\"\nlisten = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[store]\nkind = \"jetstream\"\n\n[store.jetstream]\nurl = \"{url}\"\ntimeout = \"5s\"\n\n[observability]\nlog = \"info\"\nmetrics = \"127.0.0.1:0\"\n\n[audit]\nkey = \"{}\"\n\n[policy]\nhashing_key = \"{}\"\n",
            pki.hub_dir.join("ca.pem").display(),
            pki.hub_dir.join("hub.pem").display(),
            pki.hub_dir.join("hub.key").display(),
            // Every replica signs the one audit chain with the same key.
            pki.hub_dir.with_file_name("audit.key").display(),
            // And hashes with the same key.
            pki.hub_dir.with_file_name("hashing.key").display(),
        ),
    )?;
    Ok((config, addr))
}

#[test]
fn a_revocation_through_one_replica_cuts_the_agent_off_on_the_other() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let nats = Nats::start_with(dir.path(), outpost_tests::free_port()?, "max_payload: 8MB")?;
    let (config_a, addr_a) = replica(&dir.path().join("a"), &pki, &nats.url())?;
    let (config_b, addr_b) = replica(&dir.path().join("b"), &pki, &nats.url())?;
    let a = Hub::start_file(&config_a, addr_a)?;
    let b = Hub::start_file(&config_b, addr_b)?;
    let creds = pki.issue_agent("gw-1")?;
    runtime()?.block_on(async {
        // Connected to replica A, revoked through replica B's config.
        let mut raw = Raw::connect(a.addr, &creds, &[]).await?;
        revoke_closes_the_live_session(&mut raw, &b, "gw-1").await?;
        refused_as_revoked(a.addr, &creds).await?;
        refused_as_revoked(b.addr, &creds).await?;
        anyhow::Ok(())
    })?;
    let fleet = a.fleet()?;
    assert_eq!(fleet[0]["revoked"]["reason"], "stolen gateway", "{fleet:?}");
    ok("agent reinstate", a.cli(&["agent", "reinstate", "gw-1"])?)?;
    wait_until(Duration::from_secs(30), "replica B to follow", || {
        b.log()
            .matches("An operator changed agents' labels")
            .count()
            >= 2
    })?;
    runtime()?.block_on(async {
        ensure!(
            welcomed(b.addr, &creds).await?,
            "still refused after reinstating"
        );
        anyhow::Ok(())
    })?;
    Ok(())
}

/// Publishes `secret/recipe` and `public/temp` every 50 ms until dropped.
struct Publisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Publisher {
    fn start(port: u16) -> Publisher {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            runtime()?.block_on(async move {
                let mut o = rumqttc::MqttOptions::new("trust-publisher", "127.0.0.1", port);
                o.set_keep_alive(Duration::from_secs(5));
                let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
                let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
                let mut n = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    n += 1;
                    for topic in ["secret/recipe", "public/temp"] {
                        client
                            .publish(topic, rumqttc::QoS::AtLeastOnce, false, format!("{n}"))
                            .await?;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                driver.abort();
                Ok(())
            })
        });
        Publisher {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_real_agent_selects_its_rules_by_the_labels_the_hub_told_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    let broker = outpost_tests::Mosquitto::start(dir.path())?;
    let creds = pki.issue_agent("gw-1")?;
    ok(
        "agent label",
        hub.cli(&["agent", "label", "gw-1", "site=plant-a"])?,
    )?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nagents = { site = \"plant-a\" }\nstreams = [\"secret/#\"]\naction = \"deny\"\n",
    )?;
    ok(
        "policy apply",
        hub.cli(&["policy", "apply", policy.to_str().context("path")?])?,
    )?;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    // Its config says plant-b, where nothing is denied.
    let config = format!(
        r##"
[agent]
data_dir = "data"
id = "gw-1"
labels = {{ site = "plant-b" }}

[outbox]
commit_window = "1ms"

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min = "100ms"
reconnect_max = "1s"

[mqtt]
broker = "127.0.0.1:{port}"
client_id = "trust-e2e"

[[mqtt.subscribe]]
filter = "#"
qos = 1

[observability]
metrics = ""
log = "info"
"##,
        hub = hub.addr,
        port = broker.port,
        ca = creds.join("ca.pem").display(),
        cert = creds.join("agent.pem").display(),
        key = creds.join("agent.key").display(),
    );
    let data = agent_dir.join("data");
    let labels_file = data.join("labels.json");
    let mut agent = outpost_tests::Agent::start(&agent_dir, &config)?;
    wait_until(
        Duration::from_secs(60),
        "the hub's labels and policy at the agent",
        || {
            std::fs::read_to_string(&labels_file).is_ok_and(|t| t.contains("plant-a"))
                && data.join("policy.json").exists()
        },
    )?;
    let publisher = Publisher::start(broker.port);
    wait_until(
        Duration::from_secs(60),
        "20 public events at the hub",
        || hub.events_of("public/#", 100).is_ok_and(|e| e.len() >= 20),
    )?;
    drop(publisher);
    assert!(hub.events_of("secret/#", 100)?.is_empty());
    // The agent dropped the secrets itself: the hub had nothing to drop.
    let fleet = hub.fleet()?;
    assert_eq!(fleet[0]["policy_dropped"], 0, "{fleet:?}");
    assert_eq!(fleet[0]["labels_ignored"], 1, "{fleet:?}");
    let (_, shown, _) = outpost_tests::run_cli(
        &outpost_tests::bin("outpost-agent")?,
        &[
            "policy",
            "show",
            "--config",
            agent.config.to_str().context("path")?,
            "--json",
        ],
    )?;
    assert!(shown.contains(r#""labels":{"site":"plant-a"}"#), "{shown}");

    // Restarted, it states the hub's labels: nothing more is ignored.
    agent.proc.term(Duration::from_secs(30))?;
    let agent = outpost_tests::Agent::start_file(&agent.config)?;
    wait_until(Duration::from_secs(60), "the agent back", || {
        hub.fleet()
            .is_ok_and(|f| f[0]["connected"] == true && f[0]["sessions"] == 1)
    })?;
    let fleet = hub.fleet()?;
    assert_eq!(fleet[0]["labels_ignored"], 1, "{fleet:?}");
    drop(agent);
    Ok(())
}
