//! Recovery from a damaged outbox (`[outbox] on_corruption`): the damaged
//! file is moved aside, not deleted, and every event still readable from it
//! is copied into a fresh outbox under its own seq.
//!
//! Why salvage and not start empty: a gateway that lost its SD card's
//! integrity has usually lost a page or two, not its whole backlog, and the
//! hub deduplicates by `(agent_id, seq)`, so events copied with their seqs
//! can never be stored twice. Why never reuse a seq: `next_seq` is carried
//! over from the damaged file's counters when they still load, and is never
//! below a salvaged seq.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocols::event::{AgentId, EventBody};
use outpost_storage::AtPath;
use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

use super::error::OutboxError;
use super::schema::{begin, row_size, Meta};
use super::store::{Outbox, OutboxConfig};

/// What the agent does with an outbox it finds damaged at start
/// (`[outbox] on_corruption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCorruption {
    /// Move the damaged file aside (`outbox.db.corrupt-<unix time>`, with its
    /// `-wal`), copy every event still readable from it into a fresh outbox
    /// with its seq, and go on. The default: a gateway keeps collecting, and
    /// the damaged file is kept for whoever wants to look.
    #[default]
    MoveAside,
    /// Refuse to start (exit status 1), for sites that want a person to look
    /// first.
    Stop,
}

/// What [`Outbox::open_recovering`] did with a damaged outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Where the damaged file went.
    pub moved_to: PathBuf,
    /// What was wrong with it.
    pub detail: String,
    /// Events copied into the new outbox, with their seqs.
    pub salvaged: u64,
    /// Events the damaged file claimed to hold, if its counters were
    /// readable.
    pub claimed: Option<u64>,
}

/// A row read back from a damaged file.
struct Salvaged {
    seq: u64,
    ts: i64,
    stream: String,
    body: Vec<u8>,
}

/// Reads what can still be read from a damaged outbox: its counters if they
/// load, and its events scanned from both ends (a damaged page stops a
/// scan; the other direction gets what lies beyond it). Never fails.
fn salvage(path: &Path) -> (Option<Meta>, Vec<Salvaged>, Vec<u16>) {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let Ok(conn) = Connection::open_with_flags(path, flags) else {
        return (None, Vec::new(), Vec::new());
    };
    let meta = Meta::load(&conn, path).ok();
    let mut rows: BTreeMap<u64, Salvaged> = BTreeMap::new();
    for order in ["ASC", "DESC"] {
        let sql = format!("SELECT seq, ts, stream, body FROM events ORDER BY seq {order}");
        let Ok(mut stmt) = conn.prepare(&sql) else {
            continue;
        };
        let Ok(mut it) = stmt.query([]) else { continue };
        while let Ok(Some(row)) = it.next() {
            let r = (|| -> rusqlite::Result<Salvaged> {
                Ok(Salvaged {
                    seq: row.get::<_, i64>(0)? as u64,
                    ts: row.get(1)?,
                    stream: row.get(2)?,
                    body: row.get(3)?,
                })
            })();
            match r {
                // A row is kept only if its body still decodes: the hub
                // would refuse anything else.
                Ok(s) if s.seq > 0 && EventBody::decode(&s.body).is_ok() => {
                    if rows.contains_key(&s.seq) {
                        break;
                    }
                    rows.insert(s.seq, s);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    let qos2: Vec<u16> = conn
        .prepare("SELECT pkid FROM mqtt_qos2")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, i64>(0))
                .map(|it| it.flatten().filter_map(|v| u16::try_from(v).ok()).collect())
        })
        .unwrap_or_default();
    (meta, rows.into_values().collect(), qos2)
}

/// Renames `path` and its `-wal` and `-shm` companions to
/// `<path>.corrupt-<unix seconds>` (plus the companions' suffixes).
fn move_aside(path: &Path) -> Result<PathBuf, OutboxError> {
    let secs = crate::clock::unix_now().0 / 1_000_000_000;
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{secs}"));
    let to = PathBuf::from(name);
    for suffix in ["", "-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let from = PathBuf::from(from);
        if from.exists() {
            let mut dest = to.as_os_str().to_owned();
            dest.push(suffix);
            std::fs::rename(&from, PathBuf::from(dest)).map_err(|source| {
                OutboxError::MoveAside {
                    path: from.clone(),
                    source: Arc::new(source),
                }
            })?;
        }
    }
    Ok(to)
}

impl Outbox {
    /// Opens the outbox like [`open`](Self::open); if the file is damaged
    /// and `on_corruption` is [`OnCorruption::MoveAside`], moves it aside,
    /// starts a fresh outbox with every event still readable from it (seqs
    /// kept, and `next_seq` never below what the damaged file had assigned,
    /// so no seq is reused) and says what it did.
    pub fn open_recovering(
        cfg: &OutboxConfig,
        agent_id: AgentId,
        on_corruption: OnCorruption,
    ) -> Result<(Outbox, Option<Recovered>), OutboxError> {
        let detail = match Outbox::open(cfg, agent_id.clone()) {
            Ok(o) => return Ok((o, None)),
            Err(OutboxError::Corrupt { detail, .. })
                if on_corruption == OnCorruption::MoveAside =>
            {
                detail
            }
            Err(e) => return Err(e),
        };
        let moved_to = move_aside(&cfg.path)?;
        let (old_meta, rows, qos2) = salvage(&moved_to);
        let mut outbox = Outbox::open(cfg, agent_id)?;
        outbox.restore(old_meta, &rows, &qos2)?;
        Ok((
            outbox,
            Some(Recovered {
                moved_to,
                detail,
                salvaged: rows.len() as u64,
                claimed: old_meta.map(|m| m.events),
            }),
        ))
    }

    /// Copies salvaged rows and QoS 2 packet ids into this (fresh) outbox
    /// in one transaction, and carries the damaged file's counters over.
    fn restore(
        &mut self,
        old_meta: Option<Meta>,
        rows: &[Salvaged],
        qos2: &[u16],
    ) -> Result<(), OutboxError> {
        let path = self.cfg.path.clone();
        let (tx, mut meta) = begin(&mut self.conn, &path)?;
        {
            let mut insert = tx
                .prepare("INSERT INTO events (seq, ts, stream, body) VALUES (?1, ?2, ?3, ?4)")
                .at(&path)?;
            for r in rows {
                insert
                    .execute(params![r.seq, r.ts, r.stream, r.body])
                    .at(&path)?;
                meta.events += 1;
                meta.total_bytes += row_size(r.body.len(), r.stream.len());
            }
            let mut q = tx
                .prepare("INSERT OR IGNORE INTO mqtt_qos2 (pkid) VALUES (?1)")
                .at(&path)?;
            for pkid in qos2 {
                q.execute([pkid]).at(&path)?;
            }
        }
        carry_over(&mut meta, old_meta, rows);
        meta.store(&tx, &path)?;
        tx.commit().at(&path)?;
        Ok(())
    }
}

/// The counters of the fresh outbox after a salvage: the damaged file's
/// where they loaded, and `next_seq` past every seq it assigned or holds.
fn carry_over(meta: &mut Meta, old_meta: Option<Meta>, rows: &[Salvaged]) {
    let max_seq = rows.last().map_or(0, |r| r.seq);
    let min_seq = rows.first().map_or(u64::MAX, |r| r.seq);
    if let Some(old) = old_meta {
        meta.next_seq = old.next_seq;
        meta.accepted_total = old.accepted_total;
        meta.evicted_max_bytes = old.evicted_max_bytes;
        meta.evicted_max_age = old.evicted_max_age;
        meta.refused_total = old.refused_total;
        // Never claim an ack beyond what is salvaged as waiting.
        meta.acked_seq = old.acked_seq.min(min_seq.saturating_sub(1));
    } else if max_seq > 0 {
        meta.acked_seq = min_seq - 1;
    }
    meta.next_seq = meta.next_seq.max(max_seq + 1).max(meta.acked_seq + 1);
}
