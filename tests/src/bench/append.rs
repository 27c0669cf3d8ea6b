//! Measurement 1: durable outbox appends against raw SQLite batched inserts of
//! the same rows.
//!
//! Ours is `outpost_agent::outbox::Outbox::append` (one transaction per call,
//! with the outbox's bookkeeping: age-eviction probe, `meta` counters, the
//! `events_ts` index) and the group-commit writer behind `OutboxHandle`.
//! The baseline is rusqlite alone: the same file settings (WAL, the same
//! `synchronous`), a table of the same shape without the index, one prepared
//! INSERT per row, the body already encoded (postcard bytes of the same
//! `EventBody`), batches of the same size per transaction.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use outpost_agent::outbox::{spawn_writer, Outbox, OutboxConfig, Synchronous, WriterOptions};
use outpost_protocols::{AgentId, EventBody};
use rusqlite::{params, Connection};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use super::report::{median, per_sec, samples, thousands, Row, Verdict};
use super::workload::{mqtt_bodies, now_ns};

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Events per run.
    pub(crate) events: usize,
    /// Events per transaction (direct appends and baseline).
    pub(crate) batch: usize,
    /// Concurrent producers for the group-commit writer.
    pub(crate) producers: usize,
    /// Events per producer request.
    pub(crate) request: usize,
    /// Runs of each; the median is reported.
    pub(crate) reps: usize,
}

/// A row of the baseline table, encoded once before timing.
pub(crate) struct RawRow {
    ts: i64,
    stream: String,
    body: Vec<u8>,
}

fn sync_name(s: Synchronous) -> &'static str {
    match s {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    }
}

/// Runs every append measurement in `dir` and returns its rows.
pub(crate) fn run(rt: &Runtime, dir: &Path, p: Params) -> Result<Vec<Row>> {
    eprintln!(
        "outbox append: preparing {} events",
        thousands(p.events as f64)
    );
    let bodies = mqtt_bodies(p.events)?;
    let raw = raw_rows(&bodies);
    let avg_body = raw.iter().map(|r| r.body.len()).sum::<usize>() / raw.len().max(1);
    let mut rows = Vec::new();
    let mut file = 0usize;
    let mut fresh = |name: &str| {
        file += 1;
        dir.join(format!("{name}-{file}.db"))
    };
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let (mut base, mut ours, mut group) = (Vec::new(), Vec::new(), Vec::new());
        let mut txs_per_group = Vec::new();
        for rep in 0..p.reps {
            // Interleaved, so that drift on a shared machine hits both alike.
            let b = baseline(&fresh("baseline"), &raw, p.batch, sync)?;
            let o = direct(&fresh("outbox"), &bodies, p.batch, sync)?;
            let (g, txs) = grouped(rt, &fresh("writer"), &bodies, p, sync)?;
            eprintln!(
                "outbox append {} run {}: baseline {}/s, outbox {}/s, writer {}/s ({} transactions)",
                sync_name(sync),
                rep + 1,
                thousands(b),
                thousands(o),
                thousands(g),
                txs
            );
            base.push(b);
            ours.push(o);
            group.push(g);
            txs_per_group.push(txs as f64);
        }
        let b = median(&base);
        let o = median(&ours);
        let g = median(&group);
        let target = 0.5;
        rows.push(Row {
            what: format!(
                "Outbox append, synchronous={}, {} events in batches of {} (events/s; body {avg_body} B)",
                sync_name(sync),
                thousands(p.events as f64),
                p.batch
            ),
            ours: format!("{}/s", thousands(o)),
            baseline: format!("{}/s", thousands(b)),
            ratio: format!("{:.2}", o / b),
            target: format!("≥ {target}"),
            verdict: Verdict::from_bool(o / b >= target),
        });
        rows.push(Row {
            what: format!(
                "Group-commit writer, synchronous={}, {} producers × {}-event requests (events/s; ~{} transactions; vs the batch-{} baseline)",
                sync_name(sync),
                p.producers,
                p.request,
                thousands(median(&txs_per_group)),
                p.batch
            ),
            ours: format!("{}/s", thousands(g)),
            baseline: format!("{}/s", thousands(b)),
            ratio: format!("{:.2}", g / b),
            target: format!("≥ {target}"),
            verdict: Verdict::from_bool(g / b >= target),
        });
        eprintln!(
            "outbox append {}: baseline [{}], outbox [{}], writer [{}]",
            sync_name(sync),
            samples(&base),
            samples(&ours),
            samples(&group)
        );
    }
    Ok(rows)
}

fn outbox_config(path: &Path, sync: Synchronous) -> OutboxConfig {
    let mut cfg = OutboxConfig::new(path);
    cfg.synchronous = sync;
    cfg
}

fn agent_id() -> Result<AgentId> {
    AgentId::parse("bench").map_err(anyhow::Error::from)
}

/// `bodies` as the baseline's rows: postcard-encoded, as the outbox stores
/// them.
pub(crate) fn raw_rows(bodies: &[EventBody]) -> Vec<RawRow> {
    bodies
        .iter()
        .map(|b| RawRow {
            ts: b.ts.0,
            stream: b.stream.as_str().to_owned(),
            body: b.encode(),
        })
        .collect()
}

/// Raw rusqlite: returns events/s.
pub(crate) fn baseline(
    path: &Path,
    rows: &[RawRow],
    batch: usize,
    sync: Synchronous,
) -> Result<f64> {
    let mut conn = Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Synchronous::Full => 2,
            Synchronous::Normal => 1,
        },
    )?;
    conn.execute_batch(
        "CREATE TABLE events (
            seq    INTEGER PRIMARY KEY,
            ts     INTEGER NOT NULL,
            stream TEXT    NOT NULL,
            body   BLOB    NOT NULL
        );",
    )?;
    let started = Instant::now();
    let mut seq = 1u64;
    for chunk in rows.chunks(batch) {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (seq, ts, stream, body) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in chunk {
                insert.execute(params![seq, r.ts, r.stream, r.body])?;
                seq += 1;
            }
        }
        tx.commit()?;
    }
    let elapsed = started.elapsed();
    let n: u64 = conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    ensure!(n == rows.len() as u64, "baseline stored {n} rows");
    Ok(per_sec(n, elapsed))
}

/// `Outbox::append`, one call (one transaction) per batch: returns events/s.
fn direct(path: &Path, bodies: &[EventBody], batch: usize, sync: Synchronous) -> Result<f64> {
    let mut outbox = Outbox::open(&outbox_config(path, sync), agent_id()?)?;
    let started = Instant::now();
    for chunk in bodies.chunks(batch) {
        let out = outbox.append(outpost_protocols::Timestamp(now_ns()), chunk, &[])?;
        ensure!(out.accepted == chunk.len(), "outbox accepted {out:?}");
    }
    let elapsed = started.elapsed();
    let stats = outbox.stats()?;
    ensure!(
        stats.events == bodies.len() as u64,
        "outbox holds {} events",
        stats.events
    );
    Ok(per_sec(stats.events, elapsed))
}

/// The group-commit writer with concurrent producers that each await their
/// own commit before sending the next request, as a source does: returns
/// (events/s, transactions).
fn grouped(
    rt: &Runtime,
    path: &Path,
    bodies: &[EventBody],
    p: Params,
    sync: Synchronous,
) -> Result<(f64, u64)> {
    let outbox = Outbox::open(&outbox_config(path, sync), agent_id()?)?;
    let before = outbox.stats()?.transactions_total;
    // Requests are cut and dealt to producers before the clock starts.
    let mut work: Vec<Vec<Vec<EventBody>>> = vec![Vec::new(); p.producers.max(1)];
    for (i, chunk) in bodies.chunks(p.request).enumerate() {
        let n = work.len();
        work[i % n].push(chunk.to_vec());
    }
    let path: PathBuf = path.to_owned();
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let (handle, writer) = spawn_writer(outbox, WriterOptions::default(), stop.clone());
        let started = Instant::now();
        let mut producers = tokio::task::JoinSet::new();
        for requests in work {
            let h = handle.clone();
            producers.spawn(async move {
                for r in requests {
                    let len = r.len();
                    let out = h.append(r, Vec::new()).await?;
                    ensure!(out.accepted == len, "writer accepted {out:?}");
                }
                Ok::<(), anyhow::Error>(())
            });
        }
        while let Some(r) = producers.join_next().await {
            r.context("producer task")?.context("group-commit append")?;
        }
        let elapsed: Duration = started.elapsed();
        drop(handle);
        stop.cancel();
        let outbox = writer.await.context("writer task")??;
        let stats = outbox.stats()?;
        ensure!(
            stats.events == bodies.len() as u64,
            "{}: writer stored {} events",
            path.display(),
            stats.events
        );
        Ok((
            per_sec(stats.events, elapsed),
            stats.transactions_total - before,
        ))
    })
}
