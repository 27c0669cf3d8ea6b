//! The Modbus source: TCP and RTU devices polled on their own schedules.

mod connect;
mod source;

pub use source::ModbusSource;
