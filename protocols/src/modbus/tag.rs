//! What a tag is: the table it lives in, the type its registers hold, their
//! byte order and address, gathered in a [`TagSpec`].
//!
//! These are the words both the codec and the read planner speak, so they sit
//! in a room of their own below both; neither has to reach up to the parent
//! module for them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One of the four Modbus data tables (section 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// Read-write single bits (function codes 1, 5, 15).
    Coil,
    /// Read-only single bits (function code 2).
    Discrete,
    /// Read-write 16-bit registers (function codes 3, 6, 16, 22).
    Holding,
    /// Read-only 16-bit registers (function code 4).
    Input,
}

impl Table {
    /// Whether the table holds bits rather than 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }

    /// Whether the protocol allows writing to the table.
    pub fn is_writable(self) -> bool {
        matches!(self, Table::Coil | Table::Holding)
    }

    /// The most items one read may ask for: 2000 bits (section 6.1, 6.2) or 125
    /// registers (section 6.3, 6.4).
    pub fn max_per_read(self) -> u16 {
        if self.is_bits() {
            2000
        } else {
            125
        }
    }
}

impl fmt::Display for Table {
    /// The table's name as configuration spells it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Coil => "coil",
            Table::Discrete => "discrete",
            Table::Holding => "holding",
            Table::Input => "input",
        })
    }
}

/// The type a tag's registers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// A coil or discrete input, or one bit of a register (with `bit`).
    Bool,
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Four registers, unsigned.
    U64,
    /// Four registers, two's complement.
    I64,
    /// Two registers, IEEE 754 binary32.
    F32,
    /// Four registers, IEEE 754 binary64.
    F64,
    /// A fixed number of registers holding two ASCII/UTF-8 bytes each.
    String,
}

impl DataType {
    /// How many registers a value of this type occupies (strings: their length).
    pub fn registers(self, string_len: u16) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String => string_len,
        }
    }
}

impl fmt::Display for DataType {
    /// The type's name as configuration spells it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String => "string",
        })
    }
}

/// The order of bytes in a multi-register value, named as device manuals do:
/// `abcd` is big-endian throughout (the Modbus default, section 4.2), `badc`
/// swaps the bytes of each register, `cdab` reverses the register order, `dcba`
/// does both. For 64-bit values the register order is reversed as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ByteOrder {
    /// Big-endian registers in big-endian order.
    #[default]
    Abcd,
    /// Bytes swapped within each register.
    Badc,
    /// Registers in little-endian order.
    Cdab,
    /// Little-endian throughout.
    Dcba,
}

impl fmt::Display for ByteOrder {
    /// The order's name as configuration spells it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ByteOrder::Abcd => "abcd",
            ByteOrder::Badc => "badc",
            ByteOrder::Cdab => "cdab",
            ByteOrder::Dcba => "dcba",
        })
    }
}

/// A zero-based protocol address (the address on the wire, not the 4xxxx label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RegisterAddress(pub u16);

impl fmt::Display for RegisterAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Everything needed to read, decode and write one tag.
#[derive(Debug, Clone, PartialEq)]
pub struct TagSpec {
    /// The table the tag lives in.
    pub table: Table,
    /// The first register or bit.
    pub address: RegisterAddress,
    /// The value type.
    pub data_type: DataType,
    /// Byte order of multi-register values (and of string bytes).
    pub order: ByteOrder,
    /// For `bool` in a register table: the bit number, 0 (least significant) to 15.
    pub bit: Option<u8>,
    /// For `string`: the length in registers.
    pub length: u16,
    /// The value is `raw * scale + offset`.
    pub scale: f64,
    /// The value is `raw * scale + offset`.
    pub offset: f64,
}

impl TagSpec {
    /// How many registers (or bits, in a bit table) the tag occupies.
    pub fn width(&self) -> u16 {
        if self.table.is_bits() {
            1
        } else {
            self.data_type.registers(self.length)
        }
    }

    /// Whether scale and offset leave raw values unchanged, so integers stay
    /// integers.
    pub fn is_unscaled(&self) -> bool {
        self.scale == 1.0 && self.offset == 0.0
    }
}
