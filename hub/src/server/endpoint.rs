//! The QUIC endpoint's settings: the TLS and transport configuration every
//! agent connection gets, and the UDP socket it listens on.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::wire::ALPN;

use super::error::ServerError;

/// How long a connection may stay silent, keep-alives included, before it
/// is dropped: well beyond the sessions' own 30 s idle timeout, which closes
/// it with a named code first.
const IDLE_TIMEOUT_MS: u32 = 60_000;

/// The QUIC server configuration: the hub's certificate followed by the
/// fleet CA's, client certificates checked against the fleet CA, ALPNs
/// `outpost/1` and `outpost-enroll/1`, one bidirectional stream per
/// connection.
///
/// A client certificate is optional at TLS, so that a device can enroll
/// before it has one; `accept` requires one on `outpost/1`.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<quinn::ServerConfig, ServerError> {
    let mut tls = outpost_tls::enrolling_server_config(ca, cert, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec(), outpost_protocols::enroll::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The hub's UDP socket, with large kernel buffers: a thousand agents
/// redialling at once (after a hub restart, say) send their handshakes in one
/// burst, and the default buffer (about 200 KB) drops most of it, so agents
/// wait out QUIC's doubling handshake retries. The kernel caps the size at
/// `net.core.rmem_max`/`wmem_max`; a refusal leaves the default.
pub(super) fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
