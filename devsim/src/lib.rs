//! A Modbus TCP device simulator for demos, tests and benchmarks.
//!
//! It serves the four tables from memory with tokio-modbus's server, changes
//! configured points over time (sine, ramp, counter, constant), accepts writes
//! (so bridges can be tested end to end) and injects the faults a real PLC
//! shows: addresses past the table size answer exception 2 (illegal data
//! address), and a "silent" range never answers, so the client times out.
//!
//! tokio-modbus's server spawns one task per connection that it does not hand
//! back; that is acceptable for a simulator, never for the agent.
//!
//! It is a crate of its own, not a module of the agent, so that the shipped
//! agent does not link a Modbus server; and not a part of `outpost-tests`, so
//! that the demo and `cross/smoke` build a small device without the test
//! harness (the hub, NATS, plotters). The tests and the benchmark harness use
//! it as a library ([`bind`], [`serve`]) or run its binary, `outpost-devsim`.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

use std::future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_protocols::modbus::{ByteOrder, DataType, RegisterAddress, Table, TagSpec, WriteData};
use outpost_protocols::Value;
use outpost_settings::HumanDuration;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

/// The simulator's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Where to listen (`127.0.0.1:5020`; port 0 picks one).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Size of each table; reads past it answer exception 2.
    #[serde(default = "default_size")]
    pub size: u32,
    /// How often points change.
    #[serde(default = "default_tick")]
    pub tick: HumanDuration,
    /// Requests touching `[start, end)` of any table are never answered.
    #[serde(default)]
    pub silent: Option<(u16, u16)>,
    /// Holding registers `0..counters` count up once per tick (benchmarks).
    #[serde(default)]
    pub counters: u16,
    /// Points that change over time.
    #[serde(default)]
    pub points: Vec<Point>,
}

fn default_listen() -> String {
    "127.0.0.1:5020".into()
}
fn default_size() -> u32 {
    65536
}
fn default_tick() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}

/// How a point's value changes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Wave {
    /// Stays at `value`.
    #[default]
    Constant,
    /// `min..max` along a sine of `period`.
    Sine,
    /// `min` to `max` linearly over `period`, then again.
    Ramp,
    /// `value` plus one per tick.
    Counter,
}

/// One simulated point.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// Table.
    pub table: Table,
    /// Zero-based address.
    pub address: u16,
    /// Type.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Byte order.
    #[serde(default)]
    pub order: ByteOrder,
    /// For strings: length in registers.
    #[serde(default)]
    pub length: u16,
    /// Initial or constant value (a number, a bool or a string).
    #[serde(default)]
    pub value: Option<toml::Value>,
    /// Waveform.
    #[serde(default)]
    pub wave: Wave,
    /// Lower bound for sine and ramp.
    #[serde(default)]
    pub min: f64,
    /// Upper bound for sine and ramp.
    #[serde(default = "default_max")]
    pub max: f64,
    /// Period of sine and ramp.
    #[serde(default = "default_period")]
    pub period: HumanDuration,
}

fn default_max() -> f64 {
    100.0
}
fn default_period() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// The simulated memory.
#[derive(Debug)]
pub struct Tables {
    /// Coils.
    pub coils: Vec<bool>,
    /// Discrete inputs.
    pub discrete: Vec<bool>,
    /// Holding registers.
    pub holding: Vec<u16>,
    /// Input registers.
    pub input: Vec<u16>,
}

impl Tables {
    fn new(size: usize) -> Tables {
        Tables {
            coils: vec![false; size],
            discrete: vec![false; size],
            holding: vec![0; size],
            input: vec![0; size],
        }
    }

    /// Stores a value at a point, encoded as the point's type and order.
    pub fn set(
        &mut self,
        table: Table,
        address: u16,
        data_type: DataType,
        order: ByteOrder,
        length: u16,
        value: &Value,
    ) -> Result<(), String> {
        // The codec encodes writes only for writable tables; the simulator
        // writes read-only tables too, so it encodes as the writable twin.
        let twin = match table {
            Table::Coil | Table::Discrete => Table::Coil,
            Table::Holding | Table::Input => Table::Holding,
        };
        let spec = TagSpec {
            table: twin,
            address: RegisterAddress(address),
            data_type,
            order,
            bit: None,
            length,
            scale: 1.0,
            offset: 0.0,
        };
        let data = spec.encode_write(value).map_err(|e| e.to_string())?;
        let a = usize::from(address);
        match (table, data) {
            (Table::Coil, WriteData::Coil(b)) => set_at(&mut self.coils, a, &[b]),
            (Table::Discrete, WriteData::Coil(b)) => set_at(&mut self.discrete, a, &[b]),
            (Table::Holding, WriteData::Registers(w)) => set_at(&mut self.holding, a, &w),
            (Table::Input, WriteData::Registers(w)) => set_at(&mut self.input, a, &w),
            _ => Err("unsupported point".into()),
        }
    }
}

fn set_at<T: Copy>(v: &mut [T], at: usize, values: &[T]) -> Result<(), String> {
    let end = at + values.len();
    let slot = v
        .get_mut(at..end)
        .ok_or_else(|| format!("address {at} past the table"))?;
    slot.copy_from_slice(values);
    Ok(())
}

/// A running simulator.
#[derive(Clone)]
pub struct Sim {
    tables: Arc<Mutex<Tables>>,
    size: usize,
    silent: Option<(u16, u16)>,
}

impl Sim {
    /// The memory, for tests to set and inspect.
    pub fn tables(&self) -> Arc<Mutex<Tables>> {
        self.tables.clone()
    }

    fn in_range(&self, addr: u16, cnt: usize) -> bool {
        usize::from(addr) + cnt <= self.size
    }

    fn is_silent(&self, addr: u16, cnt: usize) -> bool {
        match self.silent {
            Some((s, e)) => {
                usize::from(addr) < usize::from(e) && usize::from(addr) + cnt > usize::from(s)
            }
            None => false,
        }
    }

    fn answer(&self, req: Request<'static>) -> Result<Option<Response>, ExceptionCode> {
        let (addr, cnt) = match &req {
            Request::ReadCoils(a, c)
            | Request::ReadDiscreteInputs(a, c)
            | Request::ReadHoldingRegisters(a, c)
            | Request::ReadInputRegisters(a, c) => (*a, usize::from(*c)),
            Request::WriteSingleCoil(a, _)
            | Request::WriteSingleRegister(a, _)
            | Request::MaskWriteRegister(a, _, _) => (*a, 1),
            Request::WriteMultipleCoils(a, v) => (*a, v.len()),
            Request::WriteMultipleRegisters(a, v) => (*a, v.len()),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        if self.is_silent(addr, cnt) {
            return Ok(None);
        }
        if !self.in_range(addr, cnt) {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let a = usize::from(addr);
        let mut t = self
            .tables
            .lock()
            .map_err(|_| ExceptionCode::ServerDeviceFailure)?;
        let resp = match req {
            Request::ReadCoils(_, _) => Response::ReadCoils(t.coils[a..a + cnt].to_vec()),
            Request::ReadDiscreteInputs(_, _) => {
                Response::ReadDiscreteInputs(t.discrete[a..a + cnt].to_vec())
            }
            Request::ReadHoldingRegisters(_, _) => {
                Response::ReadHoldingRegisters(t.holding[a..a + cnt].to_vec())
            }
            Request::ReadInputRegisters(_, _) => {
                Response::ReadInputRegisters(t.input[a..a + cnt].to_vec())
            }
            Request::WriteSingleCoil(_, b) => {
                t.coils[a] = b;
                Response::WriteSingleCoil(addr, b)
            }
            Request::WriteSingleRegister(_, w) => {
                t.holding[a] = w;
                Response::WriteSingleRegister(addr, w)
            }
            Request::MaskWriteRegister(_, and, or) => {
                let cur = t.holding[a];
                t.holding[a] = (cur & and) | (or & !and);
                Response::MaskWriteRegister(addr, and, or)
            }
            Request::WriteMultipleCoils(_, v) => {
                t.coils[a..a + cnt].copy_from_slice(&v);
                Response::WriteMultipleCoils(addr, cnt as u16)
            }
            Request::WriteMultipleRegisters(_, v) => {
                t.holding[a..a + cnt].copy_from_slice(&v);
                Response::WriteMultipleRegisters(addr, cnt as u16)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        Ok(Some(resp))
    }
}

impl Service for Sim {
    type Request = Request<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        future::ready(self.answer(req))
    }
}

fn initial(p: &Point) -> Value {
    match &p.value {
        Some(toml::Value::Boolean(b)) => Value::Bool(*b),
        Some(toml::Value::Integer(i)) => {
            if matches!(p.data_type, DataType::F32 | DataType::F64) {
                Value::F64(*i as f64)
            } else {
                Value::I64(*i)
            }
        }
        Some(toml::Value::Float(f)) => Value::F64(*f),
        Some(toml::Value::String(s)) => Value::String(s.clone()),
        _ => match p.data_type {
            DataType::Bool => Value::Bool(false),
            DataType::String => Value::String(String::new()),
            DataType::F32 | DataType::F64 => Value::F64(p.min),
            _ => Value::I64(p.min as i64),
        },
    }
}

fn value_at(p: &Point, start: &Value, elapsed: Duration, ticks: u64) -> Value {
    let period = p.period.0.as_secs_f64().max(0.001);
    let phase = (elapsed.as_secs_f64() % period) / period;
    let x = match p.wave {
        Wave::Constant => return start.clone(),
        Wave::Counter => {
            return match start {
                Value::I64(i) => Value::I64(i.wrapping_add(ticks as i64) & 0xFFFF),
                Value::F64(f) => Value::F64(f + ticks as f64),
                Value::Bool(_) => Value::Bool(ticks % 2 == 1),
                other => other.clone(),
            }
        }
        Wave::Sine => p.min + (p.max - p.min) * (0.5 + 0.5 * (phase * std::f64::consts::TAU).sin()),
        Wave::Ramp => p.min + (p.max - p.min) * phase,
    };
    match p.data_type {
        DataType::F32 | DataType::F64 => Value::F64(x),
        DataType::Bool => Value::Bool(phase >= 0.5),
        _ => Value::I64(x.round() as i64),
    }
}

/// Loads a simulator config file.
pub fn load(path: &Path) -> Result<SimConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Binds the listener; returns the simulator and its address.
pub async fn bind(cfg: &SimConfig) -> Result<(Sim, TcpListener, SocketAddr), String> {
    if cfg.tick.0.is_zero() {
        return Err("tick: must be longer than zero".into());
    }
    let size = usize::try_from(cfg.size.min(65536)).unwrap_or(65536);
    let mut tables = Tables::new(size);
    for (i, p) in cfg.points.iter().enumerate() {
        tables
            .set(
                p.table,
                p.address,
                p.data_type,
                p.order,
                p.length,
                &initial(p),
            )
            .map_err(|e| format!("points[{i}]: {e}"))?;
    }
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let sim = Sim {
        tables: Arc::new(Mutex::new(tables)),
        size,
        silent: cfg.silent,
    };
    Ok((sim, listener, addr))
}

/// Serves and animates until `shutdown`.
pub async fn serve(
    cfg: SimConfig,
    sim: Sim,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let server = Server::new(listener);
    let svc = sim.clone();
    let new_service = move |_addr| Ok(Some(svc.clone()));
    let on_connected = move |stream, addr| {
        let ns = new_service.clone();
        async move { accept_tcp_connection(stream, addr, ns) }
    };
    let animate = async {
        let start = Instant::now();
        let starts: Vec<Value> = cfg.points.iter().map(initial).collect();
        let mut ticker = tokio::time::interval(cfg.tick.0);
        let mut ticks = 0u64;
        loop {
            ticker.tick().await;
            ticks += 1;
            let Ok(mut t) = sim.tables.lock() else { return };
            for (p, s) in cfg.points.iter().zip(&starts) {
                // Constant points were set once at start; rewriting them would
                // undo what clients wrote.
                if p.wave == Wave::Constant {
                    continue;
                }
                let v = value_at(p, s, start.elapsed(), ticks);
                let _ = t.set(p.table, p.address, p.data_type, p.order, p.length, &v);
            }
            for i in 0..usize::from(cfg.counters).min(t.holding.len()) {
                t.holding[i] = t.holding[i].wrapping_add(1);
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        () = animate => Ok(()),
        r = server.serve(&on_connected, |_e| {}) => r.map_err(|e| e.to_string()),
    }
}
