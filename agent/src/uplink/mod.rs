//! The uplink: the thin quinn driver of the sans-IO
//! [`AgentSession`](outpost_protocols::wire::AgentSession).
//!
//! It makes no protocol decisions. It dials the hub over QUIC with the agent's
//! certificate, opens one bidirectional stream, feeds the session what the hub
//! sends, the time and the outbox's last committed seq, reads the outbox and
//! reports its backlog when the session asks, gives a stop its deadline, and
//! deletes from the outbox what the hub acknowledged. A lost
//! connection is redialled with exponential backoff and jitter; the new session
//! resumes from the watermark the hub sends in its `Welcome`.
//!
//! The rooms: `dial` (the reconnect loop and the QUIC client), `driver` (one
//! connection's loop around the session), `gate` (the policy applied again
//! at send, and `hold` pacing), `marks` (the hub's marks applied to the
//! outbox), `renew` (the certificate's renewal and expiry), `timing` (the
//! ingest latency and recovery KPIs) and `error`.
//!
//! Architecture invariant: the outbox deletes a row only after the hub
//! acknowledged its seq, which the hub does only after its store committed it.

mod dial;
mod driver;
mod error;
mod gate;
mod marks;
mod renew;
mod timing;

pub use dial::Uplink;
pub use error::UplinkError;
