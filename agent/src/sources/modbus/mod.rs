//! The Modbus source: TCP and RTU devices polled on their own schedules.

mod source;

pub use source::ModbusSource;
