//! Opening a device's transport (TCP or a serial line) as a Modbus client
//! context.
//!
//! Kept apart from the polling loop because it is the only part that knows
//! how a transport is configured; the loop only sees a connected [`Context`]
//! or a [`ConnectError`] to log and back off on.

use std::time::Duration;

use tokio_modbus::client::Context;
use tokio_modbus::Slave;

use crate::config::{DeviceSettings, Transport};

/// Why a device could not be reached. The message is one line for the log;
/// the OS's or the serial library's error stays its source.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    /// The device's host name did not resolve.
    #[error("resolve {address}: {source}")]
    Resolve {
        /// `host:port` as configured.
        address: String,
        /// What the resolver said.
        source: std::io::Error,
    },
    /// The host name resolved to no address at all.
    #[error("resolve {address}: no address")]
    NoAddress {
        /// `host:port` as configured.
        address: String,
    },
    /// The TCP connection was refused or failed.
    #[error("connect {address}: {source}")]
    Connect {
        /// `host:port` as configured.
        address: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The serial port could not be opened.
    #[error("open {port}: {source}")]
    Open {
        /// The serial device, such as `/dev/ttyUSB0`.
        port: String,
        /// What the serial library said.
        source: tokio_serial::Error,
    },
    /// Nothing answered within the device's timeout (at least 1 s).
    #[error("connect timed out")]
    TimedOut,
}

/// Connects to `device` as its configured unit, giving up after its timeout
/// (at least 1 s, so a short poll timeout does not make a slow handshake fail).
pub(super) async fn connect(device: &DeviceSettings) -> Result<Context, ConnectError> {
    let limit = device.timeout.max(Duration::from_secs(1));
    match tokio::time::timeout(limit, open(device)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::TimedOut),
    }
}

async fn open(device: &DeviceSettings) -> Result<Context, ConnectError> {
    let slave = Slave(device.unit);
    match &device.transport {
        Transport::Tcp { address } => {
            let addr = tokio::net::lookup_host(address)
                .await
                .map_err(|source| ConnectError::Resolve {
                    address: address.clone(),
                    source,
                })?
                .next()
                .ok_or_else(|| ConnectError::NoAddress {
                    address: address.clone(),
                })?;
            tokio_modbus::client::tcp::connect_slave(addr, slave)
                .await
                .map_err(|source| ConnectError::Connect {
                    address: address.clone(),
                    source,
                })
        }
        Transport::Rtu {
            port,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => {
            use tokio_serial::SerialPortBuilderExt as _;
            let parity = match parity.as_str() {
                "even" => tokio_serial::Parity::Even,
                "odd" => tokio_serial::Parity::Odd,
                _ => tokio_serial::Parity::None,
            };
            let data_bits = if *data_bits == 7 {
                tokio_serial::DataBits::Seven
            } else {
                tokio_serial::DataBits::Eight
            };
            let stop_bits = if *stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            };
            let stream = tokio_serial::new(port, *baud)
                .parity(parity)
                .data_bits(data_bits)
                .stop_bits(stop_bits)
                .open_native_async()
                .map_err(|source| ConnectError::Open {
                    port: port.clone(),
                    source,
                })?;
            Ok(tokio_modbus::client::rtu::attach_slave(stream, slave))
        }
    }
}
