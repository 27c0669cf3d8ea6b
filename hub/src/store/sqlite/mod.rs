//! The SQLite backend of the hub's store: one file (`hub.db`, format in the
//! parent module's docs), one writer connection on the storage crate's group
//! commit, and readers for the operator verbs.
//!
//! Split by concern: the schema, events and watermarks, the fleet registry,
//! the sinks' queues, the audit log (its entries commit in the same
//! transactions as what they record), the writer's side of the file
//! (`store`), its group-commit backend (`writer`), and the read-only side
//! (`reader`). This root only gathers their names.

pub mod audit;
mod binding;
pub mod commands;
pub mod enrollments;
mod events;
mod reader;
mod registry;
mod rows;
pub(crate) mod schema;
mod sink_queue;
mod store;
pub mod trust;
mod writer;

pub use events::{AgentEventStats, EventQuery};
pub use reader::StoreReader;
pub use schema::SCHEMA_VERSION;
pub use store::{bind_certificate, open_admin, store_path, Store, FILE_NAME};
pub use writer::spawn_store_writer;
