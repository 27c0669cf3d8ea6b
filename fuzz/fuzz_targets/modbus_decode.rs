//! Register replies come from devices: decoding any words as any tag type and
//! byte order must return a value or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocols::modbus::{ByteOrder, DataType, RegisterAddress, Table, TagSpec};

const TYPES: [DataType; 10] = [
    DataType::Bool,
    DataType::U16,
    DataType::I16,
    DataType::U32,
    DataType::I32,
    DataType::U64,
    DataType::I64,
    DataType::F32,
    DataType::F64,
    DataType::String,
];
const ORDERS: [ByteOrder; 4] = [ByteOrder::Abcd, ByteOrder::Badc, ByteOrder::Cdab, ByteOrder::Dcba];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let spec = TagSpec {
        table: if data[0] & 1 == 0 { Table::Holding } else { Table::Input },
        address: RegisterAddress(u16::from(data[1])),
        data_type: TYPES[usize::from(data[0] >> 1) % TYPES.len()],
        order: ORDERS[usize::from(data[2]) % ORDERS.len()],
        bit: (data[0] & 0x80 != 0).then_some(data[3] % 20),
        length: u16::from(data[3] % 8),
        scale: if data[2] & 0x80 != 0 { 0.5 } else { 1.0 },
        offset: 0.0,
    };
    let words: Vec<u16> = data[4..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    let _ = spec.validate();
    let _ = spec.decode_registers(&words);
    if let Ok(v) = spec.decode_registers(&words) {
        let _ = spec.encode_write(&v);
    }
});
