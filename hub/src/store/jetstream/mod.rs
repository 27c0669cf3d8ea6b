//! The hub's store on NATS JetStream (`[store] kind = "jetstream"`): the hub
//! keeps no state of its own, so that several replicas can serve one fleet
//! side by side and an agent can reconnect to any of them.
//!
//! ```text
//! stream  <stream> (OUTPOST_EVENTS)      subjects <subject>.> (outpost.events.>)
//!   one message per event, subject <subject>.<agent_id>
//!   Nats-Msg-Id:    <agent_id>:<seq>     the stream drops a repeat within
//!                                        its duplicate_window
//!   Outpost-Stream: <stream name>        filter without decoding
//!   payload:        postcard EventBody   the bytes the agent's outbox held
//! KV <prefix>_watermarks  key <agent_id> → decimal seq: the highest seq
//!                                        stored for the agent; raised by
//!                                        compare-and-set, never lowered
//! KV <prefix>_agents      key <agent_id> → JSON registry record
//! KV <prefix>_policy      key v.<version, 20 digits> → JSON policy version
//! KV <prefix>_replicas    key <replica>  → JSON, max_age 30 s: who is alive
//! KV <prefix>_enrollments key <SHA-256 of a token> → JSON enrollment
//!                                        token; taken by compare-and-set
//! KV <prefix>_api_tokens, <prefix>_policy_proposals: the API's tokens
//!                                        and proposals (`api::auth`),
//!                                        through `buckets`
//! KV <prefix>_hub         key quic-reset-secret → 32 bytes shared by the
//!                                        replicas' QUIC endpoints;
//!                          key trust-generation → raised by each label
//!                                        change and revocation (`trust`);
//!                          key audit-public-key → the fleet's audit public
//!                                        key (hex), set by the first replica
//! stream  <PREFIX>_AUDIT (OUTPOST_AUDIT), subject <prefix>_audit: the
//!   audit log, one chain appended by every replica (`audit`)
//! stream  <sinks_stream> (OUTPOST_SINKS), KV <prefix>_sinks and
//!   KV <prefix>_sink_leases: the sinks' queues, counters and leases
//!   (`sink_queues`)
//! ```
//!
//! Why the watermark and not the stream's deduplication: JetStream forgets a
//! `Nats-Msg-Id` after its duplicate window (two minutes by default), and an
//! agent whose hub went away can send a batch again hours later. A replica
//! therefore stores nothing at or below the agent's watermark, and
//! acknowledges a batch only after (1) the stream acknowledged every publish
//! of it and (2) the watermark was raised past it by compare-and-set on its
//! KV revision, and (3) the batch follows what the watermark covers (a batch
//! queued behind one that failed is refused, or the watermark would pass
//! over the failed one's events). So every seq at or below the watermark is
//! in the stream, and a session resumes after the watermark.
//!
//! Why not resume after the agent's last message in the stream, which a
//! replica killed between (1) and (2) leaves above the watermark: the stream
//! may hold later events of a failed group without earlier ones (publishes
//! lost with a dropped connection, later ones sent on the next), so the last
//! message does not prove that everything before it is there. Those events
//! are sent again by the agent instead, and the duplicate window drops them:
//! exactly once when the agent is back within `duplicate_window` (two minutes
//! by default) of such a failure; after that, the events of that one
//! unacknowledged group may be stored twice, never lost.
//!
//! Why one publish per event and not one per batch: so that the stream's own
//! deduplication and consumers that filter by subject see events, not
//! batches. Publishes of a group are pipelined,
//! so a group costs one round trip for the acks and one per agent for the
//! watermark.
//!
//! The backend serves the same request queue as the SQLite writer
//! (`StoreHandle`), so agent sessions do not know which store they use.
//! The registry is informational (`fleet list`); `last_seen` from batches is
//! written at most every `SEEN_EVERY` per agent, to keep the registry off
//! the ingest path.
//!
//! The parts, one concern each: `settings` (`[store.jetstream]`), `setup`
//! (connecting, the streams and buckets), `connection` (the store's handle
//! and what every part shares), `events` (events and watermarks),
//! `backend` (the writer backend that stores groups of them), `registry`,
//! `policy_versions`, `sink_queues`, `trust` (labels and revocation) and
//! `audit`.

mod audit;
mod backend;
mod buckets;
mod connection;
mod enrollments;
mod events;
mod policy_versions;
mod registry;
mod settings;
mod setup;
mod sink_queues;
mod trust;

pub use backend::{spawn_jetstream_writer, SEEN_EVERY};
pub use connection::JetStreamStore;
pub use settings::{JetStreamStoreConfig, RawJetStreamStoreConfig};
pub use setup::LEASE_TTL;
pub use sink_queues::{LeaseLost, SinkQueueReader, LEASE_HOLD, LEASE_REFRESH};
