//! Turning a tag's registers into a [`Value`] and a [`Value`] into a write.
//!
//! Modbus itself only moves 16-bit registers, each sent high byte first
//! (section 4.2); how wider values are spread over several registers is up to
//! the device. The four byte orders cover what device manuals describe. Naming
//! the big-endian bytes of a value `A B C D` (32 bits) or `A B C D E F G H`
//! (64 bits), the registers hold:
//!
//! ```text
//! order   16-bit   32-bit      64-bit
//! abcd    [AB]     [AB CD]     [AB CD EF GH]
//! badc    [BA]     [BA DC]     [BA DC FE HG]
//! cdab    [AB]     [CD AB]     [GH EF CD AB]
//! dcba    [BA]     [DC BA]     [HG FE DC BA]
//! ```
//!
//! So `badc` and `dcba` swap the two bytes of every register, and `cdab` and
//! `dcba` reverse the order of the registers as a whole. Strings keep their
//! registers in order (the first characters are in the first register); `badc`
//! and `dcba` put the first character of each pair in the low byte.
//!
//! A `bool` in a register table names a bit of the register's 16-bit value after
//! the byte order is applied, exactly as a `u16` tag over the same register would
//! read it, so the bit numbers of a `u16` and of its `bool` tags agree.

use crate::event::Value;

use super::tag::{ByteOrder, DataType, RegisterAddress, Table, TagSpec};

/// The longest string tag, in registers: one read of holding or input registers
/// asks for at most 125 (sections 6.3 and 6.4).
pub const MAX_STRING_REGISTERS: u16 = 125;

/// The most registers one write may carry: function code 16 (Write Multiple
/// Registers) takes 1 to 123 (section 6.12).
pub const MAX_WRITE_REGISTERS: u16 = 123;

/// Errors in a tag's definition, in decoding its registers or in encoding a value
/// for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// A coil or discrete input tag had a type other than `bool`: those tables
    /// hold single bits (section 4.3).
    #[error("a {table} tag must be bool, not {data_type}")]
    TypeDoesNotFitTable {
        /// The tag's table.
        table: Table,
        /// The type it was given.
        data_type: DataType,
    },
    /// A `bool` tag in a register table had no bit number.
    #[error("a bool tag in a register table needs a bit number (0 to 15)")]
    BitRequired,
    /// A `bool` tag in a register table had a bit number above 15.
    #[error("bit {0} is out of range: a register has bits 0 to 15")]
    BitOutOfRange(u8),
    /// A bit number was given for a tag that is not a `bool` in a register table.
    #[error("a {data_type} tag in the {table} table takes no bit number")]
    BitNotAllowed {
        /// The tag's table.
        table: Table,
        /// The tag's type.
        data_type: DataType,
    },
    /// A string tag's length was 0 or more than [`MAX_STRING_REGISTERS`].
    #[error("string length {0} is out of range: use 1 to 125 registers")]
    StringLength(u16),
    /// The tag would run past the last address, 65535 (section 4.4).
    #[error("a tag of {width} registers at address {address} runs past address 65535")]
    AddressOverflow {
        /// The tag's first address.
        address: RegisterAddress,
        /// How many registers or bits it spans.
        width: u16,
    },
    /// The scale was zero, infinite or NaN, so values could not be written back.
    #[error("scale {0} is invalid: it must be finite and not zero")]
    BadScale(f64),
    /// The offset was infinite or NaN.
    #[error("offset {0} is invalid: it must be finite")]
    BadOffset(f64),
    /// A scale or offset was given for a `bool` or `string` tag, which have no
    /// numeric value to scale.
    #[error("a {0} tag takes no scale or offset")]
    ScaleNotAllowed(DataType),
    /// A write was asked for a table the protocol only lets clients read
    /// (section 4.3).
    #[error("the {0} table is read-only")]
    NotWritable(Table),
    /// A write would need more registers than one request may carry (function
    /// code 16, section 6.12), so it could not be written in one piece.
    #[error("a tag of {0} registers cannot be written in one request: the limit is 123")]
    WriteTooWide(u16),
    /// The value to write was of a kind the tag's type cannot hold.
    #[error("a {expected} tag cannot be written from a {got} value")]
    ValueType {
        /// The tag's type.
        expected: DataType,
        /// The kind of value given.
        got: &'static str,
    },
    /// The value to write, after undoing scale and offset, does not fit the tag's
    /// type.
    #[error("value {value} does not fit a {data_type} tag")]
    OutOfRange {
        /// The value as given.
        value: String,
        /// The tag's type.
        data_type: DataType,
    },
    /// A string to write was longer than the tag's registers hold.
    #[error("a string of {len} bytes does not fit in {capacity} bytes")]
    StringTooLong {
        /// The string's length in bytes.
        len: usize,
        /// Two bytes per register of the tag.
        capacity: usize,
    },
    /// The registers could not be decoded as the tag's type.
    #[error("{0}")]
    Decode(String),
}

/// What to send to write a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteData {
    /// One coil (function code 5, section 6.5).
    Coil(bool),
    /// Registers starting at the tag's address (function code 16, section 6.12,
    /// or 6 for a single register, section 6.6).
    Registers(Vec<u16>),
    /// One bit of a holding register, changed without touching the others
    /// (function code 22, section 6.16): the device stores
    /// `(current AND and_mask) OR (or_mask AND NOT and_mask)`.
    MaskRegister {
        /// Bits of the current value to keep.
        and_mask: u16,
        /// Bits to set among those not kept.
        or_mask: u16,
    },
}

impl WriteData {
    /// The register a mask write leaves behind, given what the register held.
    /// Other kinds of write do not depend on the current value and give `None`.
    pub fn apply_mask(&self, current: u16) -> Option<u16> {
        match *self {
            // Section 6.16 defines the result this way.
            WriteData::MaskRegister { and_mask, or_mask } => {
                Some((current & and_mask) | (or_mask & !and_mask))
            }
            WriteData::Coil(_) | WriteData::Registers(_) => None,
        }
    }
}

impl ByteOrder {
    /// Whether the two bytes of each register are swapped.
    fn swaps_bytes(self) -> bool {
        matches!(self, ByteOrder::Badc | ByteOrder::Dcba)
    }

    /// Whether the registers of a multi-register value come last first.
    fn reverses_registers(self) -> bool {
        matches!(self, ByteOrder::Cdab | ByteOrder::Dcba)
    }

    /// Converts between a register on the wire and the same register in
    /// big-endian byte order; swapping is its own inverse, so this goes both ways.
    fn fix_word(self, word: u16) -> u16 {
        if self.swaps_bytes() {
            word.swap_bytes()
        } else {
            word
        }
    }

    /// Joins up to four registers into the value's big-endian bits.
    fn join(self, words: &[u16]) -> u64 {
        let push = |acc: u64, word: &u16| (acc << 16) | u64::from(self.fix_word(*word));
        if self.reverses_registers() {
            words.iter().rev().fold(0, push)
        } else {
            words.iter().fold(0, push)
        }
    }

    /// Splits the low `16 * count` bits of a value into `count` registers; the
    /// inverse of [`ByteOrder::join`].
    fn split(self, bits: u64, count: u16) -> Vec<u16> {
        let mut words: Vec<u16> = (0..count)
            .rev()
            .map(|i| self.fix_word((bits >> (16 * u32::from(i))) as u16))
            .collect();
        if self.reverses_registers() {
            words.reverse();
        }
        words
    }
}

impl DataType {
    /// Whether values of the type are numbers that scale and offset apply to.
    fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::String)
    }
}

/// The kind of a value, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "bool",
        Value::I64(_) => "i64",
        Value::U64(_) => "u64",
        Value::F64(_) => "f64",
        Value::String(_) => "string",
        Value::Bytes(_) => "bytes",
        Value::Json(_) => "json",
    }
}

/// The value as text, for error messages.
fn show(value: &Value) -> String {
    match value {
        Value::Bool(b) => b.to_string(),
        Value::I64(i) => i.to_string(),
        Value::U64(u) => u.to_string(),
        Value::F64(f) => f.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::Json(j) => j.as_str().to_owned(),
    }
}

impl TagSpec {
    /// Checks that the tag can be read (and, for writable tables, written):
    /// its type fits its table, a bit number is present exactly where one is
    /// needed, a string's length is in range, the tag ends at or before address
    /// 65535, and scale and offset are usable.
    pub fn validate(&self) -> Result<(), MapError> {
        if self.table.is_bits() {
            if self.data_type != DataType::Bool {
                return Err(MapError::TypeDoesNotFitTable {
                    table: self.table,
                    data_type: self.data_type,
                });
            }
            if self.bit.is_some() {
                return Err(self.bit_not_allowed());
            }
        } else {
            match (self.data_type, self.bit) {
                (DataType::Bool, None) => return Err(MapError::BitRequired),
                (DataType::Bool, Some(bit)) if bit > 15 => {
                    return Err(MapError::BitOutOfRange(bit))
                }
                (DataType::Bool, Some(_)) | (_, None) => {}
                (_, Some(_)) => return Err(self.bit_not_allowed()),
            }
        }
        if self.data_type == DataType::String && !(1..=MAX_STRING_REGISTERS).contains(&self.length)
        {
            return Err(MapError::StringLength(self.length));
        }
        let width = self.width();
        // Addresses are 16 bits on the wire (section 4.4), so the last item a tag
        // covers must be 65535 at most.
        if u32::from(self.address.0) + u32::from(width) > 65536 {
            return Err(MapError::AddressOverflow {
                address: self.address,
                width,
            });
        }
        if self.data_type.is_numeric() {
            // A zero or non-finite scale has no inverse, so writes could not undo it.
            if !self.scale.is_finite() || self.scale == 0.0 {
                return Err(MapError::BadScale(self.scale));
            }
            if !self.offset.is_finite() {
                return Err(MapError::BadOffset(self.offset));
            }
        } else if !self.is_unscaled() {
            return Err(MapError::ScaleNotAllowed(self.data_type));
        }
        Ok(())
    }

    fn bit_not_allowed(&self) -> MapError {
        MapError::BitNotAllowed {
            table: self.table,
            data_type: self.data_type,
        }
    }

    /// Decodes the tag's registers, exactly `width()` of them, as read from a
    /// holding or input table.
    ///
    /// Integers stay integers when the tag is unscaled (`U64` for unsigned
    /// types, `I64` for signed ones) and become `raw * scale + offset` as `F64`
    /// otherwise; floats are always `F64`. Strings lose trailing NULs and spaces,
    /// which devices use as padding, and must be valid UTF-8.
    pub fn decode_registers(&self, words: &[u16]) -> Result<Value, MapError> {
        self.validate()?;
        if self.table.is_bits() {
            return Err(MapError::Decode(format!(
                "a {} tag is read as bits, not registers",
                self.table
            )));
        }
        let width = self.width();
        if words.len() != usize::from(width) {
            return Err(MapError::Decode(format!(
                "expected {width} registers, got {}",
                words.len()
            )));
        }
        let value = match self.data_type {
            DataType::String => return self.decode_string(words),
            DataType::Bool => {
                let bit = self.bit.ok_or(MapError::BitRequired)?;
                let word = self.order.join(words);
                Value::Bool((word >> bit) & 1 == 1)
            }
            DataType::U16 | DataType::U32 | DataType::U64 => {
                let raw = self.order.join(words);
                if self.is_unscaled() {
                    Value::U64(raw)
                } else {
                    Value::F64(self.scale_raw(raw as f64))
                }
            }
            DataType::I16 | DataType::I32 | DataType::I64 => {
                let raw = sign_extend(self.order.join(words), 16 * u32::from(width));
                if self.is_unscaled() {
                    Value::I64(raw)
                } else {
                    Value::F64(self.scale_raw(raw as f64))
                }
            }
            DataType::F32 => {
                let raw = f32::from_bits(self.order.join(words) as u32);
                Value::F64(self.scale_raw(f64::from(raw)))
            }
            DataType::F64 => Value::F64(self.scale_raw(f64::from_bits(self.order.join(words)))),
        };
        Ok(value)
    }

    /// The value of a coil or discrete input tag, read as one bit.
    pub fn decode_bit(&self, bit: bool) -> Value {
        Value::Bool(bit)
    }

    /// Encodes a value for writing to the tag, the inverse of decoding: scale
    /// and offset are undone, integers are rounded to the nearest raw value, and
    /// strings are padded with NULs.
    ///
    /// Only coils and holding registers can be written (section 4.3). A `bool`
    /// in a holding register becomes a mask write so the register's other bits
    /// stay as the device has them.
    pub fn encode_write(&self, value: &Value) -> Result<WriteData, MapError> {
        self.validate()?;
        if !self.table.is_writable() {
            return Err(MapError::NotWritable(self.table));
        }
        if self.table.is_bits() {
            return self.encode_bool(value).map(WriteData::Coil);
        }
        let width = self.width();
        if width > MAX_WRITE_REGISTERS {
            return Err(MapError::WriteTooWide(width));
        }
        let bits = match self.data_type {
            DataType::Bool => {
                let bit = self.bit.ok_or(MapError::BitRequired)?;
                let on = self.encode_bool(value)?;
                let mask = self.order.fix_word(1 << bit);
                return Ok(WriteData::MaskRegister {
                    and_mask: !mask,
                    or_mask: if on { mask } else { 0 },
                });
            }
            DataType::String => return self.encode_string(value),
            DataType::U16 | DataType::U32 | DataType::U64 => self.encode_integer(value, false)?,
            DataType::I16 | DataType::I32 | DataType::I64 => self.encode_integer(value, true)?,
            DataType::F32 => {
                let raw = self.unscale(value)?;
                let narrow = raw as f32;
                // A finite value that only becomes infinite in binary32 does not fit;
                // infinities and NaN given as such are written as they are.
                if raw.is_finite() && !narrow.is_finite() {
                    return Err(self.out_of_range(value));
                }
                u64::from(narrow.to_bits())
            }
            DataType::F64 => self.unscale(value)?.to_bits(),
        };
        Ok(WriteData::Registers(self.order.split(bits, width)))
    }

    /// `raw * scale + offset`, leaving the raw value untouched when unscaled so
    /// that `-0.0` and NaN payloads survive.
    fn scale_raw(&self, raw: f64) -> f64 {
        if self.is_unscaled() {
            raw
        } else {
            raw * self.scale + self.offset
        }
    }

    /// `(value - offset) / scale` for a numeric value; an error if a finite value
    /// becomes infinite on the way.
    fn unscale(&self, value: &Value) -> Result<f64, MapError> {
        let v = match value {
            Value::I64(i) => *i as f64,
            Value::U64(u) => *u as f64,
            Value::F64(f) => *f,
            other => return Err(self.wrong_type(other)),
        };
        if self.is_unscaled() {
            return Ok(v);
        }
        let raw = (v - self.offset) / self.scale;
        if v.is_finite() && !raw.is_finite() {
            return Err(self.out_of_range(value));
        }
        Ok(raw)
    }

    /// The raw two's complement bits of an integer write; integers given to an
    /// unscaled tag are converted exactly rather than through a float, which
    /// would lose the low bits of large 64-bit values.
    fn encode_integer(&self, value: &Value, signed: bool) -> Result<u64, MapError> {
        let bits = 16 * u32::from(self.width());
        let (min, max): (i128, i128) = if signed {
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        } else {
            (0, (1 << bits) - 1)
        };
        let raw: i128 = match value {
            Value::I64(i) if self.is_unscaled() => i128::from(*i),
            Value::U64(u) if self.is_unscaled() => i128::from(*u),
            _ => {
                let raw = self.unscale(value)?.round();
                // Both bounds are powers of two, so they are exact as floats and
                // the cast below is exact too.
                if !(raw >= min as f64 && raw < (max + 1) as f64) {
                    return Err(self.out_of_range(value));
                }
                raw as i128
            }
        };
        if raw < min || raw > max {
            return Err(self.out_of_range(value));
        }
        // Keeping the low 64 bits gives two's complement for negative values, and
        // `split` keeps only the tag's own low bits of that.
        Ok(raw as u64)
    }

    fn encode_bool(&self, value: &Value) -> Result<bool, MapError> {
        match value {
            Value::Bool(b) => Ok(*b),
            Value::I64(0) | Value::U64(0) => Ok(false),
            Value::I64(1) | Value::U64(1) => Ok(true),
            Value::I64(_) | Value::U64(_) => Err(self.out_of_range(value)),
            other => Err(self.wrong_type(other)),
        }
    }

    fn decode_string(&self, words: &[u16]) -> Result<Value, MapError> {
        let mut bytes: Vec<u8> = words
            .iter()
            .flat_map(|w| self.order.fix_word(*w).to_be_bytes())
            .collect();
        // Devices pad fixed-length strings with NULs or spaces; both are ASCII,
        // so trimming them cannot cut a multi-byte character.
        let end = bytes
            .iter()
            .rposition(|&b| b != 0 && b != b' ')
            .map_or(0, |i| i + 1);
        bytes.truncate(end);
        String::from_utf8(bytes)
            .map(Value::String)
            .map_err(|e| MapError::Decode(format!("string is not valid UTF-8: {e}")))
    }

    fn encode_string(&self, value: &Value) -> Result<WriteData, MapError> {
        let Value::String(s) = value else {
            return Err(self.wrong_type(value));
        };
        let capacity = 2 * usize::from(self.length);
        if s.len() > capacity {
            return Err(MapError::StringTooLong {
                len: s.len(),
                capacity,
            });
        }
        let mut bytes = s.as_bytes().to_vec();
        bytes.resize(capacity, 0);
        let words = bytes
            .chunks_exact(2)
            .map(|pair| self.order.fix_word(u16::from_be_bytes([pair[0], pair[1]])))
            .collect();
        Ok(WriteData::Registers(words))
    }

    fn wrong_type(&self, value: &Value) -> MapError {
        MapError::ValueType {
            expected: self.data_type,
            got: kind(value),
        }
    }

    fn out_of_range(&self, value: &Value) -> MapError {
        MapError::OutOfRange {
            value: show(value),
            data_type: self.data_type,
        }
    }
}

/// Reads the low `bits` bits of `raw` as a two's complement number.
fn sign_extend(raw: u64, bits: u32) -> i64 {
    let shift = 64 - bits;
    ((raw << shift) as i64) >> shift
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ORDERS: [ByteOrder; 4] = [
        ByteOrder::Abcd,
        ByteOrder::Badc,
        ByteOrder::Cdab,
        ByteOrder::Dcba,
    ];

    fn tag(table: Table, data_type: DataType) -> TagSpec {
        TagSpec {
            table,
            address: RegisterAddress(0),
            data_type,
            order: ByteOrder::Abcd,
            bit: None,
            length: 0,
            scale: 1.0,
            offset: 0.0,
        }
    }

    fn holding(data_type: DataType, order: ByteOrder) -> TagSpec {
        TagSpec {
            order,
            ..tag(Table::Holding, data_type)
        }
    }

    fn registers(data: WriteData) -> Vec<u16> {
        match data {
            WriteData::Registers(words) => words,
            other => panic!("expected registers, got {other:?}"),
        }
    }

    fn round_trip(spec: &TagSpec, value: &Value) -> Value {
        let words = registers(spec.encode_write(value).expect("encodes"));
        assert_eq!(words.len(), usize::from(spec.width()));
        spec.decode_registers(&words).expect("decodes")
    }

    fn arb_order() -> impl Strategy<Value = ByteOrder> {
        prop::sample::select(ORDERS.to_vec())
    }

    /// An integer type with a value from its full range, as the unscaled decoder
    /// should give it back.
    fn arb_integer() -> impl Strategy<Value = (DataType, Value)> {
        prop_oneof![
            any::<u16>().prop_map(|v| (DataType::U16, Value::U64(v.into()))),
            any::<i16>().prop_map(|v| (DataType::I16, Value::I64(v.into()))),
            any::<u32>().prop_map(|v| (DataType::U32, Value::U64(v.into()))),
            any::<i32>().prop_map(|v| (DataType::I32, Value::I64(v.into()))),
            any::<u64>().prop_map(|v| (DataType::U64, Value::U64(v))),
            any::<i64>().prop_map(|v| (DataType::I64, Value::I64(v))),
        ]
    }

    /// A raw integer for a type, kept within 2^50 for 64-bit types so that
    /// `raw * scale + offset` still determines `raw` in a float.
    fn arb_scaled_raw() -> impl Strategy<Value = (DataType, f64)> {
        const LIMIT: i64 = 1 << 50;
        prop_oneof![
            any::<u16>().prop_map(|v| (DataType::U16, f64::from(v))),
            any::<i16>().prop_map(|v| (DataType::I16, f64::from(v))),
            any::<u32>().prop_map(|v| (DataType::U32, f64::from(v))),
            any::<i32>().prop_map(|v| (DataType::I32, f64::from(v))),
            (0..LIMIT).prop_map(|v| (DataType::U64, v as f64)),
            (-LIMIT..LIMIT).prop_map(|v| (DataType::I64, v as f64)),
            (-1.0e6f64..1.0e6).prop_map(|v| (DataType::F32, f64::from(v as f32))),
            (-1.0e12f64..1.0e12).prop_map(|v| (DataType::F64, v)),
        ]
    }

    fn arb_scale() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.1),
            Just(0.01),
            Just(-1.0),
            Just(10.0),
            (0.001f64..1000.0),
            (-1000.0f64..-0.001),
        ]
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::I64),
            any::<u64>().prop_map(Value::U64),
            any::<f64>().prop_map(Value::F64),
            ".{0,8}".prop_map(Value::String),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
        ]
    }

    proptest! {
        #[test]
        fn every_integer_type_round_trips_in_every_byte_order(
            (data_type, value) in arb_integer(),
            order in arb_order(),
        ) {
            let spec = holding(data_type, order);
            prop_assert_eq!(round_trip(&spec, &value), value);
        }

        #[test]
        fn every_f32_round_trips_bit_for_bit_in_every_byte_order(x in any::<f32>(), order in arb_order()) {
            let spec = holding(DataType::F32, order);
            let Value::F64(back) = round_trip(&spec, &Value::F64(f64::from(x))) else {
                panic!("f32 decodes as f64");
            };
            let back = back as f32;
            if x.is_nan() {
                prop_assert!(back.is_nan());
            } else {
                prop_assert_eq!(back.to_bits(), x.to_bits());
            }
        }

        #[test]
        fn every_f64_round_trips_bit_for_bit_in_every_byte_order(x in any::<f64>(), order in arb_order()) {
            let spec = holding(DataType::F64, order);
            let Value::F64(back) = round_trip(&spec, &Value::F64(x)) else {
                panic!("f64 decodes as f64");
            };
            if x.is_nan() {
                prop_assert!(back.is_nan());
            } else {
                prop_assert_eq!(back.to_bits(), x.to_bits());
            }
        }

        #[test]
        fn scaled_values_round_trip_within_one_raw_step(
            (data_type, raw) in arb_scaled_raw(),
            order in arb_order(),
            scale in arb_scale(),
            offset in -1000.0f64..1000.0,
        ) {
            let spec = TagSpec { scale, offset, ..holding(data_type, order) };
            let value = raw * scale + offset;
            let Value::F64(back) = round_trip(&spec, &Value::F64(value)) else {
                panic!("scaled values decode as f64");
            };
            // Floats lose a few ulps to the arithmetic, relative to the terms that
            // were added; integers may also move by one raw step when rounding.
            let magnitude = (raw * scale).abs() + offset.abs() + 1.0;
            let step = if matches!(data_type, DataType::F32 | DataType::F64) { 0.0 } else { scale.abs() };
            let tolerance = 1e-6 * magnitude + step;
            prop_assert!((back - value).abs() <= tolerance, "{value} came back as {back}");
        }

        #[test]
        fn printable_strings_round_trip_in_every_byte_order(
            (length, text) in (1u16..=MAX_WRITE_REGISTERS).prop_flat_map(|len| {
                (Just(len), proptest::string::string_regex(&format!("[ -~]{{0,{}}}", 2 * len))
                    .expect("valid regex"))
            }),
            order in arb_order(),
        ) {
            let spec = TagSpec { length, ..holding(DataType::String, order) };
            let expected = text.trim_end_matches([' ', '\0']).to_owned();
            prop_assert_eq!(round_trip(&spec, &Value::String(text)), Value::String(expected));
        }

        #[test]
        fn a_mask_write_changes_only_its_bit(
            bit in 0u8..16,
            on in any::<bool>(),
            current in any::<u16>(),
            order in arb_order(),
        ) {
            let spec = TagSpec { bit: Some(bit), ..holding(DataType::Bool, order) };
            let write = spec.encode_write(&Value::Bool(on)).expect("encodes");
            let after = write.apply_mask(current).expect("a mask write");
            prop_assert_eq!(spec.decode_registers(&[after]).expect("decodes"), Value::Bool(on));
            let other = TagSpec { bit: Some((bit + 1) % 16), ..spec.clone() };
            prop_assert_eq!(
                other.decode_registers(&[after]).expect("decodes"),
                other.decode_registers(&[current]).expect("decodes"),
            );
        }

        #[test]
        fn decoding_arbitrary_registers_never_panics(
            words in prop::collection::vec(any::<u16>(), 0..8),
            data_type in prop::sample::select(vec![
                DataType::Bool, DataType::U16, DataType::I16, DataType::U32, DataType::I32,
                DataType::U64, DataType::I64, DataType::F32, DataType::F64, DataType::String,
            ]),
            table in prop::sample::select(vec![Table::Coil, Table::Discrete, Table::Holding, Table::Input]),
            bit in prop::option::of(any::<u8>()),
            length in 0u16..8,
            order in arb_order(),
        ) {
            let spec = TagSpec { bit, length, order, ..tag(table, data_type) };
            let _ = spec.decode_registers(&words);
            let _ = spec.encode_write(&Value::F64(1.5));
            let _ = spec.encode_write(&Value::String("x".into()));
        }

        #[test]
        fn encoding_arbitrary_values_never_panics(
            value in arb_value(),
            (data_type, _) in arb_integer(),
            scale in prop_oneof![Just(1.0), arb_scale()],
        ) {
            let spec = TagSpec { scale, ..holding(data_type, ByteOrder::Abcd) };
            let _ = spec.encode_write(&value);
        }
    }

    #[test]
    fn known_vectors_decode_in_each_byte_order() {
        // 123.456 as binary32 is 0x42F6E979.
        let f32_words = [
            (ByteOrder::Abcd, [0x42F6, 0xE979]),
            (ByteOrder::Badc, [0xF642, 0x79E9]),
            (ByteOrder::Cdab, [0xE979, 0x42F6]),
            (ByteOrder::Dcba, [0x79E9, 0xF642]),
        ];
        for (order, words) in f32_words {
            let spec = holding(DataType::F32, order);
            assert_eq!(
                spec.decode_registers(&words).expect("decodes"),
                Value::F64(f64::from(123.456f32)),
                "{order}"
            );
            assert_eq!(
                registers(spec.encode_write(&Value::F64(123.456)).expect("encodes")),
                words
            );
        }
        let u64_words = [
            (ByteOrder::Abcd, [0x0102, 0x0304, 0x0506, 0x0708]),
            (ByteOrder::Badc, [0x0201, 0x0403, 0x0605, 0x0807]),
            (ByteOrder::Cdab, [0x0708, 0x0506, 0x0304, 0x0102]),
            (ByteOrder::Dcba, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, words) in u64_words {
            let spec = holding(DataType::U64, order);
            assert_eq!(
                spec.decode_registers(&words).expect("decodes"),
                Value::U64(0x0102_0304_0506_0708),
                "{order}"
            );
        }
        let i32_words = [
            (ByteOrder::Abcd, [0xFFFE, 0x1DC0]),
            (ByteOrder::Badc, [0xFEFF, 0xC01D]),
            (ByteOrder::Cdab, [0x1DC0, 0xFFFE]),
            (ByteOrder::Dcba, [0xC01D, 0xFEFF]),
        ];
        for (order, words) in i32_words {
            let spec = holding(DataType::I32, order);
            assert_eq!(
                spec.decode_registers(&words).expect("decodes"),
                Value::I64(-123_456),
                "{order}"
            );
        }
        for (order, word) in [
            (ByteOrder::Abcd, 0x1234),
            (ByteOrder::Badc, 0x3412),
            (ByteOrder::Cdab, 0x1234),
            (ByteOrder::Dcba, 0x3412),
        ] {
            let spec = holding(DataType::U16, order);
            assert_eq!(
                spec.decode_registers(&[word]).expect("decodes"),
                Value::U64(0x1234),
                "{order}"
            );
        }
        for (order, word) in [
            (ByteOrder::Abcd, 0x4142),
            (ByteOrder::Badc, 0x4241),
            (ByteOrder::Cdab, 0x4142),
            (ByteOrder::Dcba, 0x4241),
        ] {
            let spec = TagSpec {
                length: 2,
                ..holding(DataType::String, order)
            };
            assert_eq!(
                spec.decode_registers(&[word, 0x2000]).expect("decodes"),
                Value::String("AB".into()),
                "{order}"
            );
        }
    }

    #[test]
    fn scaled_integers_decode_as_floats_and_unscaled_stay_integers() {
        let spec = TagSpec {
            scale: 0.1,
            offset: -40.0,
            ..holding(DataType::I16, ByteOrder::Abcd)
        };
        let Value::F64(v) = spec.decode_registers(&[650]).expect("decodes") else {
            panic!("scaled values are floats");
        };
        assert!((v - 25.0).abs() < 1e-9);
        let raw = holding(DataType::I16, ByteOrder::Abcd);
        assert_eq!(
            raw.decode_registers(&[0xFFFF]).expect("decodes"),
            Value::I64(-1)
        );
        let raw = holding(DataType::U16, ByteOrder::Abcd);
        assert_eq!(
            raw.decode_registers(&[0xFFFF]).expect("decodes"),
            Value::U64(65535)
        );
    }

    #[test]
    fn bits_of_a_register_decode_from_the_least_significant() {
        let spec = TagSpec {
            bit: Some(0),
            ..tag(Table::Input, DataType::Bool)
        };
        assert_eq!(
            spec.decode_registers(&[0x0001]).expect("decodes"),
            Value::Bool(true)
        );
        let spec = TagSpec {
            bit: Some(15),
            ..spec
        };
        assert_eq!(
            spec.decode_registers(&[0x8000]).expect("decodes"),
            Value::Bool(true)
        );
        assert_eq!(
            spec.decode_registers(&[0x7FFF]).expect("decodes"),
            Value::Bool(false)
        );
        let coil = tag(Table::Coil, DataType::Bool);
        assert_eq!(coil.decode_bit(true), Value::Bool(true));
    }

    #[test]
    fn a_mask_write_follows_section_6_16() {
        let spec = TagSpec {
            bit: Some(3),
            ..holding(DataType::Bool, ByteOrder::Abcd)
        };
        let set = spec.encode_write(&Value::Bool(true)).expect("encodes");
        assert_eq!(
            set,
            WriteData::MaskRegister {
                and_mask: 0xFFF7,
                or_mask: 0x0008
            }
        );
        assert_eq!(set.apply_mask(0x0012), Some(0x001A));
        let clear = spec.encode_write(&Value::U64(0)).expect("encodes");
        assert_eq!(clear.apply_mask(0xFFFF), Some(0xFFF7));
        // The example of section 6.16.
        let example = WriteData::MaskRegister {
            and_mask: 0x00F2,
            or_mask: 0x0025,
        };
        assert_eq!(example.apply_mask(0x0012), Some(0x0017));
    }

    #[test]
    fn coils_accept_bools_and_zero_or_one() {
        let coil = tag(Table::Coil, DataType::Bool);
        assert_eq!(
            coil.encode_write(&Value::Bool(true)),
            Ok(WriteData::Coil(true))
        );
        assert_eq!(
            coil.encode_write(&Value::I64(0)),
            Ok(WriteData::Coil(false))
        );
        assert_eq!(coil.encode_write(&Value::U64(1)), Ok(WriteData::Coil(true)));
        assert!(matches!(
            coil.encode_write(&Value::I64(2)),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            coil.encode_write(&Value::F64(1.0)),
            Err(MapError::ValueType { .. })
        ));
    }

    #[test]
    fn writes_out_of_range_or_of_the_wrong_type_are_refused() {
        let u16_tag = holding(DataType::U16, ByteOrder::Abcd);
        assert!(matches!(
            u16_tag.encode_write(&Value::U64(65536)),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            u16_tag.encode_write(&Value::I64(-1)),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            u16_tag.encode_write(&Value::F64(f64::NAN)),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            u16_tag.encode_write(&Value::F64(65535.6)),
            Err(MapError::OutOfRange { .. })
        ));
        assert_eq!(
            registers(u16_tag.encode_write(&Value::F64(65534.6)).expect("encodes")),
            [65535]
        );
        assert!(matches!(
            u16_tag.encode_write(&Value::Bool(true)),
            Err(MapError::ValueType { .. })
        ));
        assert!(matches!(
            u16_tag.encode_write(&Value::String("1".into())),
            Err(MapError::ValueType {
                expected: DataType::U16,
                got: "string"
            })
        ));
        let i16_tag = holding(DataType::I16, ByteOrder::Abcd);
        assert_eq!(
            registers(i16_tag.encode_write(&Value::I64(-32768)).expect("encodes")),
            [0x8000]
        );
        assert!(matches!(
            i16_tag.encode_write(&Value::I64(32768)),
            Err(MapError::OutOfRange { .. })
        ));
        let u64_tag = holding(DataType::U64, ByteOrder::Abcd);
        assert!(matches!(
            u64_tag.encode_write(&Value::F64(1.8446744073709552e19)),
            Err(MapError::OutOfRange { .. })
        ));
        let f32_tag = holding(DataType::F32, ByteOrder::Abcd);
        assert!(matches!(
            f32_tag.encode_write(&Value::F64(1e39)),
            Err(MapError::OutOfRange { .. })
        ));
        let scaled = TagSpec {
            scale: 1e-300,
            ..holding(DataType::F64, ByteOrder::Abcd)
        };
        assert!(matches!(
            scaled.encode_write(&Value::F64(1e300)),
            Err(MapError::OutOfRange { .. })
        ));
        let text = TagSpec {
            length: 1,
            ..holding(DataType::String, ByteOrder::Abcd)
        };
        assert!(matches!(
            text.encode_write(&Value::String("abc".into())),
            Err(MapError::StringTooLong {
                len: 3,
                capacity: 2
            })
        ));
        let long = TagSpec {
            length: 124,
            ..text
        };
        assert_eq!(
            long.encode_write(&Value::String("a".into())),
            Err(MapError::WriteTooWide(124))
        );
    }

    #[test]
    fn read_only_tables_refuse_writes() {
        assert_eq!(
            tag(Table::Input, DataType::U16).encode_write(&Value::U64(1)),
            Err(MapError::NotWritable(Table::Input))
        );
        assert_eq!(
            tag(Table::Discrete, DataType::Bool).encode_write(&Value::Bool(true)),
            Err(MapError::NotWritable(Table::Discrete))
        );
    }

    #[test]
    fn decoding_refuses_the_wrong_register_count_and_invalid_utf8() {
        let spec = holding(DataType::U32, ByteOrder::Abcd);
        assert!(matches!(
            spec.decode_registers(&[1]),
            Err(MapError::Decode(_))
        ));
        let text = TagSpec {
            length: 1,
            ..holding(DataType::String, ByteOrder::Abcd)
        };
        assert!(matches!(
            text.decode_registers(&[0xFF41]),
            Err(MapError::Decode(_))
        ));
        assert_eq!(
            text.decode_registers(&[0x0000]),
            Ok(Value::String(String::new()))
        );
        let coil = tag(Table::Coil, DataType::Bool);
        assert!(matches!(
            coil.decode_registers(&[1]),
            Err(MapError::Decode(_))
        ));
    }

    #[test]
    fn validation_names_each_mistake() {
        let check = |spec: TagSpec| spec.validate().err();
        assert_eq!(
            check(tag(Table::Coil, DataType::U16)),
            Some(MapError::TypeDoesNotFitTable {
                table: Table::Coil,
                data_type: DataType::U16
            })
        );
        assert_eq!(
            check(tag(Table::Holding, DataType::Bool)),
            Some(MapError::BitRequired)
        );
        assert_eq!(
            check(TagSpec {
                bit: Some(16),
                ..tag(Table::Holding, DataType::Bool)
            }),
            Some(MapError::BitOutOfRange(16))
        );
        assert_eq!(
            check(TagSpec {
                bit: Some(1),
                ..tag(Table::Holding, DataType::U16)
            }),
            Some(MapError::BitNotAllowed {
                table: Table::Holding,
                data_type: DataType::U16
            })
        );
        assert_eq!(
            check(TagSpec {
                bit: Some(1),
                ..tag(Table::Coil, DataType::Bool)
            }),
            Some(MapError::BitNotAllowed {
                table: Table::Coil,
                data_type: DataType::Bool
            })
        );
        assert_eq!(
            check(tag(Table::Holding, DataType::String)),
            Some(MapError::StringLength(0))
        );
        assert_eq!(
            check(TagSpec {
                length: 126,
                ..tag(Table::Holding, DataType::String)
            }),
            Some(MapError::StringLength(126))
        );
        assert_eq!(
            check(TagSpec {
                address: RegisterAddress(65534),
                ..tag(Table::Input, DataType::U32)
            }),
            None
        );
        assert_eq!(
            check(TagSpec {
                address: RegisterAddress(65535),
                ..tag(Table::Input, DataType::U32)
            }),
            Some(MapError::AddressOverflow {
                address: RegisterAddress(65535),
                width: 2
            })
        );
        assert_eq!(
            check(TagSpec {
                address: RegisterAddress(65535),
                ..tag(Table::Coil, DataType::Bool)
            }),
            None
        );
        assert_eq!(
            check(TagSpec {
                scale: 0.0,
                ..tag(Table::Input, DataType::U16)
            }),
            Some(MapError::BadScale(0.0))
        );
        assert!(matches!(
            check(TagSpec {
                scale: f64::NAN,
                ..tag(Table::Input, DataType::U16)
            }),
            Some(MapError::BadScale(_))
        ));
        assert!(matches!(
            check(TagSpec {
                offset: f64::INFINITY,
                ..tag(Table::Input, DataType::U16)
            }),
            Some(MapError::BadOffset(_))
        ));
        assert_eq!(
            check(TagSpec {
                scale: 2.0,
                ..tag(Table::Coil, DataType::Bool)
            }),
            Some(MapError::ScaleNotAllowed(DataType::Bool))
        );
    }

    #[test]
    fn error_messages_are_lowercase_sentences() {
        let errors = [
            MapError::BitRequired,
            MapError::NotWritable(Table::Input),
            MapError::AddressOverflow {
                address: RegisterAddress(65535),
                width: 2,
            },
            MapError::ValueType {
                expected: DataType::F32,
                got: "string",
            },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(text.starts_with(|c: char| c.is_lowercase()), "{text}");
        }
        assert_eq!(
            MapError::AddressOverflow {
                address: RegisterAddress(65535),
                width: 2
            }
            .to_string(),
            "a tag of 2 registers at address 65535 runs past address 65535"
        );
    }
}
