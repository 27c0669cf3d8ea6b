//! A user-space UDP proxy that puts the faults of a bad link between two peers
//! on loopback: it drops, delays, duplicates and reorders datagrams, and can
//! black-hole the link, with the faults switchable while it runs.
//!
//! ```text
//! client (agent) ──► proxy.addr() ──► one socket per client ──► upstream (hub)
//!                ◄──              ◄──                       ◄──
//! ```
//!
//! Each client address gets its own upstream socket, so the upstream sees one
//! peer per client, as it would through a NAT, and the replies go back to the
//! client they belong to. Faults apply to both directions alike, unless set
//! for each direction ([`UdpProxy::set_each`]: a link that carries the hub's
//! datagrams to the agent and loses every one the agent sends).
//!
//! Everything is bounded: at most [`MAX_CLIENTS`] client mappings (the oldest
//! is forgotten first) and at most [`MAX_HELD`] datagrams held back for delay
//! or reordering (beyond that they are dropped and counted). The proxy runs on
//! its own thread with its own tokio runtime and stops when dropped.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Client mappings kept at most.
pub const MAX_CLIENTS: usize = 64;

/// Datagrams held back (delayed or reordered) at most.
pub const MAX_HELD: usize = 8192;

/// The largest datagram forwarded (QUIC needs at most 1,452 bytes on a
/// standard path; anything larger is forwarded too, up to this).
const MAX_DATAGRAM: usize = 65_535;

/// What the link does to each datagram, in both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Drop every datagram (checked first).
    pub black_hole: bool,
    /// The probability of dropping a datagram.
    pub drop: f64,
    /// The probability of sending a datagram twice.
    pub duplicate: f64,
    /// The probability of holding a datagram back by up to `reorder_by`, so
    /// that datagrams sent after it overtake it.
    pub reorder: f64,
    /// How far back a reordered datagram is held at most.
    pub reorder_by: Duration,
    /// A delay every datagram gets.
    pub delay: Duration,
}

impl Faults {
    /// A perfect link.
    pub const PASS: Faults = Faults {
        black_hole: false,
        drop: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        reorder_by: Duration::ZERO,
        delay: Duration::ZERO,
    };

    /// A link that delivers nothing, either way.
    pub const BLACK_HOLE: Faults = Faults {
        black_hole: true,
        ..Faults::PASS
    };
}

/// What the proxy did so far, in datagrams (both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Received from either side.
    pub received: u64,
    /// Sent on (duplicates count twice).
    pub sent: u64,
    /// Dropped at random.
    pub dropped: u64,
    /// Sent twice.
    pub duplicated: u64,
    /// Held back so that later ones overtake them.
    pub reordered: u64,
    /// Swallowed while the link was black-holed.
    pub black_holed: u64,
    /// Dropped because [`MAX_HELD`] datagrams were already held back.
    pub overflowed: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    black_holed: AtomicU64,
    overflowed: AtomicU64,
}

/// The faults of each direction and the random source that applies them.
struct Link {
    /// Client → upstream.
    faults: Faults,
    /// Upstream → client.
    back: Faults,
    rng: u64,
}

impl Link {
    /// xorshift64*: uniform enough to pick which datagrams suffer.
    fn next_f64(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Shared {
    link: Mutex<Link>,
    counters: Counters,
    held: AtomicUsize,
    /// Where new client mappings connect, and how often it was switched.
    upstream: Mutex<(SocketAddr, u64)>,
}

/// A running proxy; stops (and joins its thread) when dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl UdpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`,
    /// passing everything until told otherwise.
    pub fn start(upstream: SocketAddr) -> Result<UdpProxy> {
        let front = std::net::UdpSocket::bind("127.0.0.1:0").context("bind the proxy")?;
        front.set_nonblocking(true)?;
        let addr = front.local_addr()?;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let shared = Arc::new(Shared {
            link: Mutex::new(Link {
                faults: Faults::PASS,
                back: Faults::PASS,
                rng: seed,
            }),
            counters: Counters::default(),
            held: AtomicUsize::new(0),
            upstream: Mutex::new((upstream, 0)),
        });
        let stop = CancellationToken::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("udp-proxy".into())
                .spawn(move || {
                    rt.block_on(async move {
                        let Ok(front) = UdpSocket::from_std(front) else {
                            return;
                        };
                        run(Arc::new(front), shared, stop).await;
                    });
                })?
        };
        Ok(UdpProxy {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Where clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the faults; datagrams already held back keep their schedule.
    pub fn set(&self, faults: Faults) {
        self.set_each(faults, faults);
    }

    /// Switches the faults of each direction: `to_upstream` for what clients
    /// send, `to_client` for what the upstream sends back.
    pub fn set_each(&self, to_upstream: Faults, to_client: Faults) {
        if let Ok(mut link) = self.shared.link.lock() {
            link.faults = to_upstream;
            link.back = to_client;
        }
    }

    /// Sends everything from now on to `upstream`, as a load balancer that
    /// moved the client to another server: every client mapping is
    /// forgotten, so the old upstream hears nothing more from its clients
    /// and their next datagrams go to the new one.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        if let Ok(mut u) = self.shared.upstream.lock() {
            *u = (upstream, u.1 + 1);
        }
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            received: get(&c.received),
            sent: get(&c.sent),
            dropped: get(&c.dropped),
            duplicated: get(&c.duplicated),
            reordered: get(&c.reordered),
            black_holed: get(&c.black_holed),
            overflowed: get(&c.overflowed),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where a datagram goes: to the upstream through a client's socket, or back
/// to a client through the front socket.
#[derive(Clone)]
enum Dest {
    Upstream(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Dest {
    async fn send(&self, data: &[u8]) {
        // A full socket buffer or an unreachable port is what a lossy link
        // does anyway: the datagram is lost.
        let _ = match self {
            Dest::Upstream(s) => s.send(data).await,
            Dest::Client(s, to) => s.send_to(data, to).await,
        };
    }
}

async fn run(front: Arc<UdpSocket>, shared: Arc<Shared>, stop: CancellationToken) {
    let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, CancellationToken)> = HashMap::new();
    let mut order: VecDeque<SocketAddr> = VecDeque::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut generation = 0;
    loop {
        let (n, from) = tokio::select! {
            () = stop.cancelled() => return,
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors surface here on some systems; keep serving.
                Err(_) => continue,
            },
        };
        let Ok((upstream, g)) = shared.upstream.lock().map(|u| *u) else {
            return;
        };
        if g != generation {
            generation = g;
            for (_, (_, t)) in clients.drain() {
                t.cancel();
            }
            order.clear();
        }
        let back = match clients.get(&from) {
            Some((s, _)) => s.clone(),
            None => {
                // Loopback to a loopback upstream; any address to another
                // host (a test's network namespace).
                let local: SocketAddr = if upstream.ip().is_loopback() {
                    ([127, 0, 0, 1], 0).into()
                } else {
                    ([0, 0, 0, 0], 0).into()
                };
                let Ok(s) = UdpSocket::bind(local).await else {
                    continue;
                };
                if s.connect(upstream).await.is_err() {
                    continue;
                }
                let s = Arc::new(s);
                if clients.len() >= MAX_CLIENTS {
                    if let Some(old) = order.pop_front() {
                        if let Some((_, t)) = clients.remove(&old) {
                            t.cancel();
                        }
                    }
                }
                let client_stop = stop.child_token();
                tokio::spawn(replies(
                    s.clone(),
                    Dest::Client(front.clone(), from),
                    shared.clone(),
                    client_stop.clone(),
                ));
                clients.insert(from, (s.clone(), client_stop));
                order.push_back(from);
                s
            }
        };
        forward(&shared, Dest::Upstream(back), &buf[..n]).await;
    }
}

/// Carries what the upstream sends on one client's socket back to the client.
async fn replies(back: Arc<UdpSocket>, to: Dest, shared: Arc<Shared>, stop: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = tokio::select! {
            () = stop.cancelled() => return,
            r = back.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        forward(&shared, to.clone(), &buf[..n]).await;
    }
}

/// Applies the current faults to one datagram.
async fn forward(shared: &Arc<Shared>, dest: Dest, data: &[u8]) {
    let c = &shared.counters;
    c.received.fetch_add(1, Ordering::Relaxed);
    // Decide everything under the lock, send after it.
    let mut delays = Vec::with_capacity(2);
    {
        let Ok(mut link) = shared.link.lock() else {
            return;
        };
        let f = match dest {
            Dest::Upstream(_) => link.faults,
            Dest::Client(..) => link.back,
        };
        if f.black_hole {
            c.black_holed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if f.drop > 0.0 && link.next_f64() < f.drop {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if f.duplicate > 0.0 && link.next_f64() < f.duplicate {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut d = f.delay;
            if f.reorder > 0.0 && link.next_f64() < f.reorder {
                c.reordered.fetch_add(1, Ordering::Relaxed);
                d += f.reorder_by.mul_f64(0.2 + 0.8 * link.next_f64());
            }
            delays.push(d);
        }
    }
    for d in delays {
        if d.is_zero() {
            dest.send(data).await;
            c.sent.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if shared.held.fetch_add(1, Ordering::AcqRel) >= MAX_HELD {
            shared.held.fetch_sub(1, Ordering::AcqRel);
            c.overflowed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let dest = dest.clone();
        let data = data.to_vec();
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            dest.send(&data).await;
            shared.counters.sent.fetch_add(1, Ordering::Relaxed);
            shared.held.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; stops when the socket is dropped with the
    /// thread's runtime.
    fn echo() -> Result<(SocketAddr, std::thread::JoinHandle<()>)> {
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = s.local_addr()?;
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    if &buf[..n] == b"stop" {
                        return;
                    }
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        Ok((addr, t))
    }

    /// Sends `n` numbered datagrams through the proxy and returns what came
    /// back within a moment, in arrival order.
    fn round_trip(proxy: &UdpProxy, n: u32) -> Result<Vec<u32>> {
        let c = std::net::UdpSocket::bind("127.0.0.1:0")?;
        c.set_read_timeout(Some(Duration::from_millis(300)))?;
        // Read while sending: a socket buffer holds only a few hundred
        // datagrams, and every loss must be one the proxy chose.
        let reader = c.try_clone()?;
        let got = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            while let Ok(k) = reader.recv(&mut buf) {
                if k == 4 {
                    got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                }
            }
            got
        });
        for i in 0..n {
            c.send_to(&i.to_be_bytes(), proxy.addr())?;
            if i % 16 == 15 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        got.join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))
    }

    #[test]
    fn a_passing_link_delivers_every_datagram_in_order_and_a_black_hole_none() -> Result<()> {
        let (echo_addr, echo_thread) = echo()?;
        let proxy = UdpProxy::start(echo_addr)?;
        let got = round_trip(&proxy, 200)?;
        assert_eq!(got, (0..200).collect::<Vec<_>>());

        proxy.set(Faults::BLACK_HOLE);
        assert!(round_trip(&proxy, 50)?.is_empty());
        assert_eq!(proxy.stats().black_holed, 50);

        let stopper = std::net::UdpSocket::bind("127.0.0.1:0")?;
        stopper.send_to(b"stop", echo_addr)?;
        let _ = echo_thread.join();
        Ok(())
    }

    #[test]
    fn a_link_black_holed_one_way_carries_the_other_way() -> Result<()> {
        let (echo_addr, echo_thread) = echo()?;
        let proxy = UdpProxy::start(echo_addr)?;
        // Out to the echo server, nothing back.
        proxy.set_each(Faults::PASS, Faults::BLACK_HOLE);
        assert!(round_trip(&proxy, 50)?.is_empty());
        let s = proxy.stats();
        assert_eq!((s.sent, s.black_holed), (50, 50), "{s:?}");
        proxy.set(Faults::PASS);
        assert_eq!(round_trip(&proxy, 20)?, (0..20).collect::<Vec<_>>());

        let stopper = std::net::UdpSocket::bind("127.0.0.1:0")?;
        stopper.send_to(b"stop", echo_addr)?;
        let _ = echo_thread.join();
        Ok(())
    }

    #[test]
    fn a_faulty_link_drops_duplicates_and_reorders_about_as_asked() -> Result<()> {
        let (echo_addr, echo_thread) = echo()?;
        let proxy = UdpProxy::start(echo_addr)?;
        proxy.set(Faults {
            drop: 0.1,
            duplicate: 0.1,
            reorder: 0.1,
            reorder_by: Duration::from_millis(20),
            ..Faults::PASS
        });
        let got = round_trip(&proxy, 2000)?;
        let s = proxy.stats();
        // Both directions pass the proxy, so each fault had two chances.
        assert!(
            s.dropped > 100 && s.duplicated > 100 && s.reordered > 100,
            "{s:?}"
        );
        assert!(
            got.len() > 1600 && got.len() < 2400,
            "{} came back",
            got.len()
        );
        assert!(got.windows(2).any(|w| w[0] > w[1]), "nothing reordered");
        assert!(got.windows(2).any(|w| w[0] == w[1]), "nothing duplicated");

        let stopper = std::net::UdpSocket::bind("127.0.0.1:0")?;
        stopper.send_to(b"stop", echo_addr)?;
        let _ = echo_thread.join();
        Ok(())
    }
}
