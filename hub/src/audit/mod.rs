//! The audit trail's rules, apart from where it is kept: how an entry is
//! hashed into the chain and signed ([`chain`]), and the hub's signing key
//! ([`key`]). Both stores (`store::audit` on SQLite, the audit stream on
//! JetStream) keep entries in this one format, so `audit verify` and the
//! policy check at load read either the same way.
//!
//! Why three defences and not one: the hash chain shows an entry edited or
//! removed in the middle; the Ed25519 signature (made with a key only the hub
//! reads, never stored with the log) shows an entry rewritten by someone who
//! can write the store but not read the key, even with its chain re-hashed;
//! and an anchor (`ID:HASH` of a recent entry, kept elsewhere) shows the
//! newest entries cut off, which neither of the others can, since a cut log
//! is a shorter valid log.
//!
//! Architecture invariant: this module reads no store; the stores call it.

pub mod chain;
pub mod key;
