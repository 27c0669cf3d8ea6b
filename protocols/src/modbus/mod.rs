//! Modbus register maps: what a tag is, how its registers decode, and how a
//! device's tags are read in as few requests as the protocol allows.
//!
//! No I/O: the agent's Modbus source performs the reads this module plans and
//! hands the replies back here to be turned into values.
//!
//! References are to the Modbus Application Protocol Specification v1.1b3.

mod codec;
mod plan;
mod tag;

pub use codec::{MapError, WriteData, MAX_STRING_REGISTERS, MAX_WRITE_REGISTERS};
pub use plan::{plan, Plan, PlanError, PlanLimits, Read, ReadReply};
pub use tag::{ByteOrder, DataType, RegisterAddress, Table, TagSpec};
