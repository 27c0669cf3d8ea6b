//! A second host on this machine: a network namespace joined to this one by a
//! veth pair, whose link can be throttled with `tc` and cut by taking it
//! down.
//!
//! The UDP proxy drops, duplicates and reorders datagrams in user space; a
//! throttled link needs the kernel's queueing (a token bucket filter, `tbf`,
//! on each end's egress), and a cut link is the kernel's too: the route goes
//! away with it. The test owns the namespace (made with `ip netns add`,
//! deleted on drop, which also deletes the veth pair), so the only targets of
//! its traffic are its own. Needs root and iproute2 (tests/run runs as root
//! and installs it).

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{ensure, Context as _, Result};

/// A network namespace with a /30 on a veth pair to this one.
pub struct Netns {
    /// The namespace's name (for `ip netns exec`).
    pub name: String,
    /// The veth end in this namespace.
    pub host_dev: String,
    /// The veth end in the namespace.
    pub ns_dev: String,
    /// This namespace's address on the link.
    pub host_addr: Ipv4Addr,
    /// The namespace's address on the link.
    pub ns_addr: Ipv4Addr,
}

/// Runs `ip` (or `tc`) with `args`, failing with what it printed.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program} (iproute2; tests/run installs it)"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// Makes the namespace and the link, both up. The names and the /30 come
    /// from this process's id, so two test processes do not collide.
    pub fn new() -> Result<Netns> {
        let id = std::process::id();
        let name = format!("outpost-{id}");
        // Interface names are at most 15 bytes.
        let tag = id % 100_000;
        let (host_dev, ns_dev) = (format!("oph{tag}"), format!("opn{tag}"));
        // 10.213.0.0/16 in /30s, by process id.
        let net = (id % 16_384) * 4;
        let (a, b) = (10u8, 213u8);
        let host_addr = Ipv4Addr::new(a, b, (net >> 8) as u8, (net & 0xff) as u8 + 1);
        let ns_addr = Ipv4Addr::new(a, b, (net >> 8) as u8, (net & 0xff) as u8 + 2);
        // A namespace left by a killed run of a process with the same id.
        let _ = run("ip", &["netns", "del", &name]);
        let _ = run("ip", &["link", "del", &host_dev]);
        let net = Ipv4Addr::from(u32::from(host_addr) - 1);
        let _ = run(
            "ip",
            &[
                "route",
                "del",
                "unreachable",
                &format!("{net}/30"),
                "metric",
                "4000",
            ],
        );
        run("ip", &["netns", "add", &name])?;
        let ns = Netns {
            name,
            host_dev,
            ns_dev,
            host_addr,
            ns_addr,
        };
        let n = ns.name.as_str();
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.host_dev,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_dev,
            ],
        )?;
        run("ip", &["link", "set", &ns.ns_dev, "netns", n])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{host_addr}/30"),
                "dev",
                &ns.host_dev,
            ],
        )?;
        run("ip", &["link", "set", &ns.host_dev, "up"])?;
        // While the link is down its connected route is gone, and traffic
        // for the namespace would take the default route off this machine
        // (and a socket connected meanwhile would keep that route's source
        // address). This route, behind the connected one, makes it fail
        // here instead.
        run(
            "ip",
            &[
                "route",
                "add",
                "unreachable",
                &format!("{}/30", Ipv4Addr::from(u32::from(host_addr) - 1)),
                "metric",
                "4000",
            ],
        )?;
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{ns_addr}/30"),
            "dev",
            &ns.ns_dev,
        ])?;
        ns.exec_ok(&["ip", "link", "set", &ns.ns_dev, "up"])?;
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn exec_ok(&self, args: &[&str]) -> Result<()> {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Throttles both directions of the link to `rate` (`tc` syntax:
    /// `2mbit`) with a token bucket filter; `None` lifts it.
    pub fn throttle(&self, rate: Option<&str>) -> Result<()> {
        for (ns, dev) in [(false, &self.host_dev), (true, &self.ns_dev)] {
            let args: Vec<&str> = match rate {
                // A burst of 32 kbit and 200 ms of queue: a slow WAN link's
                // buffer, not a lossless pipe.
                Some(r) => vec![
                    "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", r, "burst",
                    "32kbit", "latency", "200ms",
                ],
                None => vec!["tc", "qdisc", "del", "dev", dev, "root"],
            };
            let r = if ns {
                self.exec_ok(&args)
            } else {
                run(args[0], &args[1..])
            };
            // Deleting a qdisc that is not there is not an error here.
            if rate.is_some() {
                r?;
            }
        }
        Ok(())
    }

    /// Cuts the link (both ends down) or restores it.
    pub fn link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        run("ip", &["link", "set", &self.host_dev, state])?;
        self.exec_ok(&["ip", "link", "set", &self.ns_dev, state])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end and with it the pair.
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.host_dev]);
        let net = Ipv4Addr::from(u32::from(self.host_addr) - 1);
        let _ = run(
            "ip",
            &[
                "route",
                "del",
                "unreachable",
                &format!("{net}/30"),
                "metric",
                "4000",
            ],
        );
    }
}
