//! A user-space TCP proxy that puts a flapping link between a client and a
//! server on loopback: it forwards bytes both ways until told to cut, and then
//! resets every connection it carries, in both directions at once, the way a
//! broker restart, a NAT timeout or a pulled cable ends a session.
//!
//! ```text
//! client (agent) ──► proxy.addr() ──► one upstream connection per client ──► server (broker)
//!                ◄──              ◄──                                    ◄──
//! ```
//!
//! A cut sets `SO_LINGER` to zero on both sockets before closing them, so both
//! peers get a RST rather than a FIN: nothing queued is delivered, and neither
//! side can tell the cut from a dead network. New connections are accepted
//! again right away. The first bytes each client sent are kept, so a test can
//! tell whose connection it cut (an MQTT CONNECT carries the client id).
//!
//! The proxy runs on its own thread with its own tokio runtime and stops when
//! dropped, closing every connection it carries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How many of the first bytes a client sends are kept for [`Cut::first_bytes`].
pub const FIRST_BYTES: usize = 512;

/// One connection the proxy cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The first bytes (at most [`FIRST_BYTES`]) the client sent on it.
    pub first_bytes: Vec<u8>,
    /// Bytes carried from the client to the server before the cut.
    pub to_server: u64,
    /// Bytes carried from the server to the client before the cut.
    pub to_client: u64,
}

impl Cut {
    /// Whether the client's first bytes contain `needle`.
    pub fn client_sent(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.first_bytes.windows(needle.len()).any(|w| w == needle)
    }
}

/// What the proxy did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpProxyStats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Connections cut by [`TcpProxy::cut_all`].
    pub cut: u64,
    /// Connections open now.
    pub live: usize,
}

/// One carried connection, as the registry knows it.
struct Conn {
    stop: CancellationToken,
    first: Arc<Mutex<Vec<u8>>>,
    to_server: Arc<AtomicU64>,
    to_client: Arc<AtomicU64>,
}

#[derive(Default)]
struct Shared {
    conns: Mutex<HashMap<u64, Conn>>,
    accepted: AtomicU64,
    cut: AtomicU64,
}

/// A running proxy; stops (and joins its thread) when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind the proxy")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("tcp-proxy".into())
                .spawn(move || {
                    rt.block_on(async move {
                        let Ok(listener) = TcpListener::from_std(listener) else {
                            return;
                        };
                        accept(listener, upstream, shared, stop).await;
                    });
                })?
        };
        Ok(TcpProxy {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Where clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every connection open now, both ways, and says what was cut.
    /// The sockets are reset by the proxy's thread a moment later; new
    /// connections are accepted meanwhile.
    pub fn cut_all(&self) -> Vec<Cut> {
        let conns: Vec<Conn> = match self.shared.conns.lock() {
            Ok(mut m) => m.drain().map(|(_, c)| c).collect(),
            Err(_) => return Vec::new(),
        };
        self.shared
            .cut
            .fetch_add(conns.len() as u64, Ordering::Relaxed);
        conns
            .into_iter()
            .map(|c| {
                c.stop.cancel();
                Cut {
                    first_bytes: c.first.lock().map(|f| f.clone()).unwrap_or_default(),
                    to_server: c.to_server.load(Ordering::Relaxed),
                    to_client: c.to_client.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// The first bytes of every connection open now.
    pub fn live(&self) -> Vec<Vec<u8>> {
        self.shared
            .conns
            .lock()
            .map(|m| {
                m.values()
                    .map(|c| c.first.lock().map(|f| f.clone()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> TcpProxyStats {
        TcpProxyStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            cut: self.shared.cut.load(Ordering::Relaxed),
            live: self.shared.conns.lock().map(|m| m.len()).unwrap_or(0),
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut next_id = 0u64;
    loop {
        let client = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                // Out of descriptors, say: keep serving.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        next_id += 1;
        let id = next_id;
        let conn_stop = stop.child_token();
        let conn = Conn {
            stop: conn_stop.clone(),
            first: Arc::default(),
            to_server: Arc::default(),
            to_client: Arc::default(),
        };
        let (first, to_server, to_client) = (
            conn.first.clone(),
            conn.to_server.clone(),
            conn.to_client.clone(),
        );
        if let Ok(mut m) = shared.conns.lock() {
            m.insert(id, conn);
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            carry(client, upstream, conn_stop, first, to_server, to_client).await;
            if let Ok(mut m) = shared.conns.lock() {
                m.remove(&id);
            }
        });
    }
}

/// Carries one connection until either side ends it or it is cut.
async fn carry(
    mut client: TcpStream,
    upstream: SocketAddr,
    stop: CancellationToken,
    first: Arc<Mutex<Vec<u8>>>,
    to_server: Arc<AtomicU64>,
    to_client: Arc<AtomicU64>,
) {
    let mut server = tokio::select! {
        () = stop.cancelled() => {
            reset(&client);
            return;
        }
        r = TcpStream::connect(upstream) => match r {
            Ok(s) => s,
            // The server is down: the client sees its connection reset.
            Err(_) => {
                reset(&client);
                return;
            }
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let cut = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let up = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Ok(mut f) = first.lock() {
                    let room = FIRST_BYTES.saturating_sub(f.len());
                    f.extend_from_slice(&buf[..n.min(room)]);
                }
                to_server.fetch_add(n as u64, Ordering::Relaxed);
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // Counted before the write, so that a client that has read
                // the bytes never sees a count without them.
                to_client.fetch_add(n as u64, Ordering::Relaxed);
                if cw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        // Either side ending ends the connection for both.
        tokio::select! {
            () = stop.cancelled() => true,
            () = up => false,
            () = down => false,
        }
    };
    if cut {
        reset(&client);
        reset(&server);
    } else {
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
    }
}

/// Makes the close of `s` a RST: with a zero linger time the kernel drops
/// what is queued and resets the connection.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An echo server on loopback that serves until its listener thread ends
    /// with the test process.
    fn echo() -> Result<SocketAddr> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    #[test]
    fn bytes_pass_both_ways_until_a_cut_resets_the_connection() -> Result<()> {
        let proxy = TcpProxy::start(echo()?)?;
        let mut c = std::net::TcpStream::connect(proxy.addr())?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(b"hello proxy")?;
        let mut got = [0u8; 11];
        c.read_exact(&mut got)?;
        assert_eq!(&got, b"hello proxy");
        assert_eq!(proxy.stats().live, 1);

        let cuts = proxy.cut_all();
        assert_eq!(cuts.len(), 1);
        assert!(cuts[0].client_sent(b"proxy"));
        assert_eq!((cuts[0].to_server, cuts[0].to_client), (11, 11));
        // The client learns at once, with a reset, not a clean end of stream.
        let mut buf = [0u8; 16];
        let r = c.read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );

        // New connections are carried again.
        let mut c = std::net::TcpStream::connect(proxy.addr())?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        c.write_all(b"again")?;
        let mut got = [0u8; 5];
        c.read_exact(&mut got)?;
        assert_eq!(&got, b"again");
        let s = proxy.stats();
        assert_eq!((s.accepted, s.cut), (2, 1));
        Ok(())
    }
}
