//! What Linux says about a process: CPU time from `/proc/PID/stat`, memory
//! from `/proc/PID/status`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Clock ticks per second (`getconf CLK_TCK`), the unit of `utime`/`stime`.
pub(crate) fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// `utime + stime` of a process (all its threads), in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces, so the
    // fields are counted from the last ')': state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no ')' in {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("{path}: no field {n}"))?
            .parse()
            .with_context(|| format!("{path}: field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let kib = v.trim().trim_end_matches("kB").trim();
            return kib
                .parse()
                .with_context(|| format!("{path}: {key} is {v:?}"));
        }
    }
    bail!("{path}: no {key}")
}

/// CPU time of a process over a wall-clock window.
pub(crate) struct CpuWindow {
    pid: u32,
    ticks: u64,
    at: Instant,
}

impl CpuWindow {
    /// Starts the window now.
    pub(crate) fn start(pid: u32) -> Result<CpuWindow> {
        Ok(CpuWindow {
            pid,
            ticks: cpu_ticks(pid)?,
            at: Instant::now(),
        })
    }

    /// Ends the window: (percent of one core, wall time).
    pub(crate) fn stop(&self, clk_tck: u64) -> Result<(f64, Duration)> {
        let ticks = cpu_ticks(self.pid)?;
        let wall = self.at.elapsed();
        let cpu = ticks.saturating_sub(self.ticks) as f64 / clk_tck as f64;
        Ok((100.0 * cpu / wall.as_secs_f64().max(1e-9), wall))
    }
}

/// KiB as decimal megabytes, the unit of the targets (`12.3 MB`).
pub(crate) fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 * 1024.0 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(status_kib(pid, "VmRSS").expect("VmRSS") > 0);
        assert!(status_kib(pid, "NoSuchKey").is_err());
    }
}
