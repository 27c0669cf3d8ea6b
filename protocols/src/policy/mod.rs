//! The fleet policy: one TOML document, versioned by the hub, that says what
//! may leave a site, in what form, to which sinks and regions, at what rate,
//! and who may command what.
//!
//! Both ends run the same code on the same text: the agent so that denied
//! data never crosses the wire, the hub again because an agent may be old or
//! compromised. So the rules here are pure functions of the document, the
//! agent's labels, the event and a time passed in; the evaluator is compiled
//! once per version and agent ([`Policy::compile`]) and keeps only the state
//! that downsampling and rate limits need ([`Enforcer`]).
//!
//! ```text
//! text ──parse──▶ Policy ──compile(labels, catalog)──▶ Compiled ──▶ Enforcer
//!        (syntax, keys,          (rules selecting       (per-event:
//!         patterns, shadowed      this agent, index      verdict, edits,
//!         rules, residency)       by first level)        state)
//!
//! hub:   Policy.with_hashing_key(hub's key).scoped_text(text, labels)
//!          ──Policy frame──▶ agent: Policy::parse_scoped (its rules, its keys)
//! ```
//!
//! The hashing key never leaves the hub: an agent gets only the rules that
//! select it, and for each that hashes a key derived for that rule
//! (`keys.rs`, `scope.rs`), so both ends hash alike and a stolen gateway
//! learns nothing of other scopes.
//!
//! Rules are evaluated in order; the first whose `streams` match the event's
//! stream decides (like a firewall). A rule that an earlier one shadows for
//! every agent is refused as "cannot match", so the order an operator reads is
//! the order that applies. `docs/policy.md` is the language reference.

mod eval;
mod fields;
mod keys;
mod model;
mod parse;
mod scope;
#[cfg(test)]
mod tests;

pub use eval::{Compiled, DropReason, Enforcer, Stage, TokenBucket, Verdict};
pub use fields::{HASH_PREFIX, REDACTED};
pub use keys::{HashingKey, RuleKey};
pub use model::{
    digest, Action, AgentLimits, BufferLimits, Catalog, Command, CommandGrant, Downsample, Over,
    Policy, PolicyVersion, Rate, Residency, Rule, Selector, STORE_SINK,
};
pub use parse::{PolicyError, MAX_POLICY_LEN};
pub use scope::{redact_keys, KEY_REDACTED};
