//! The transparent demo's virtual network: one network namespace ("host")
//! per service instance, joined by a bridge, with one leg in the root
//! namespace where the demo's control plane listens.
//!
//! Layout, for `--subnet 10.77.93.0/24` and demo pid 4242:
//! - netns `mwd4242-net` holds the bridge `br0`; nothing runs in it. The
//!   bridge lives there, not in the root namespace, so the host's own
//!   firewall (a `FORWARD` policy of `DROP`, `br_netfilter`) cannot drop
//!   traffic between the demo's hosts;
//! - the root namespace gets one veth, `mwd4242`, with the subnet's first
//!   address (`10.77.93.1`, the "gateway": the control plane binds there and
//!   the hosts' admin servers are reachable from there); its peer is a port
//!   of the bridge;
//! - each host `mwd4242-<instance>` gets `eth0` (a veth whose peer is a
//!   bridge port) with the next address, `lo` up, a route for the mesh's VIP
//!   range (`240.240.0.0/16`: `connect()` to a VIP needs a route before the
//!   capture rules see it) and, in `/etc/netns/<host>/resolv.conf` (what `ip
//!   netns exec` mounts over `/etc/resolv.conf`), the gateway as its
//!   nameserver: the host's queries are captured and answered by its
//!   sidecar's mesh DNS; other names are forwarded there and fail fast.
//!
//! Contract: [`Network::create`] refuses a subnet that overlaps an address
//! or route of the root namespace (naming it and `--subnet`), removes stale
//! namespaces and links of the same names first (a previous run with the
//! same pid killed with SIGKILL), and on any error removes what it made.
//! [`Network::teardown`] (also run on drop) kills whatever still runs in the
//! hosts, then deletes the namespaces, their resolv.conf directories and the
//! root-namespace veth; it is idempotent and warns, naming the command to
//! run by hand, about anything it could not remove.
//!
//! Non-goals: IPv6, a route out of the virtual network (the hosts reach the
//! gateway and each other only), more than one bridge.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context as _};

/// The mesh's VIP range, routed to `eth0` in every host.
const VIP_RANGE: &str = "240.240.0.0/16";

/// An IPv4 subnet given with `--subnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Subnet {
    network: u32,
    prefix: u8,
}

impl std::str::FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let hint = "expected an IPv4 subnet, /8 to /28, e.g. 10.77.93.0/24";
        let (ip, prefix) = s.split_once('/').ok_or_else(|| format!("{s:?}: {hint}"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: {hint}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{s:?}: {hint}"))?;
        if !(8..=28).contains(&prefix) {
            return Err(format!("{s:?}: {hint}"));
        }
        let subnet = Subnet {
            network: u32::from(ip) & mask(prefix),
            prefix,
        };
        if u32::from(ip) != subnet.network {
            return Err(format!("{s:?}: host bits are set; did you mean {subnet}?"));
        }
        Ok(subnet)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl Subnet {
    /// Its `n`th address (1: the gateway), if it is not the broadcast address.
    pub(crate) fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - self.prefix);
        (u64::from(n) + 1 < size).then(|| Ipv4Addr::from(self.network + n))
    }

    fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `other` (an address `a.b.c.d` or `a.b.c.d/n`) shares an
    /// address with this subnet.
    fn overlaps(&self, other: &str) -> bool {
        let (ip, prefix) = match other.split_once('/') {
            Some((ip, p)) => (ip, p.parse::<u8>().unwrap_or(32)),
            None => (other, 32),
        };
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            return false;
        };
        let common = mask(prefix.min(self.prefix).min(32));
        u32::from(ip) & common == self.network & common
    }
}

/// One network namespace of the demo, holding one instance.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    /// The namespace's name (`mwd<pid>-<instance>`).
    pub(crate) ns: String,
    pub(crate) ip: Ipv4Addr,
}

/// The demo's network; see the module docs.
#[derive(Debug)]
pub(crate) struct Network {
    /// `mwd<pid>`: the root-namespace veth and the prefix of every name.
    pub(crate) tag: String,
    pub(crate) subnet: Subnet,
    /// The root namespace's address on it.
    pub(crate) gateway: Ipv4Addr,
    pub(crate) hosts: Vec<Host>,
    /// The namespaces to delete on teardown (made so far).
    made: Vec<String>,
}

impl Network {
    /// Builds the network with one host per name in `instances`, in order
    /// (addresses .2, .3, ...).
    pub(crate) fn create(subnet: Subnet, instances: &[&str]) -> anyhow::Result<Network> {
        let tag = format!("mwd{}", std::process::id());
        let gateway = subnet
            .host(1)
            .ok_or_else(|| anyhow!("subnet {subnet} has no room for a gateway"))?;
        let mut hosts = Vec::new();
        for (k, name) in instances.iter().enumerate() {
            let ip = u32::try_from(k + 2)
                .ok()
                .and_then(|n| subnet.host(n))
                .ok_or_else(|| {
                    anyhow!(
                        "subnet {subnet} is too small for {} hosts; pick a larger one with --subnet",
                        instances.len()
                    )
                })?;
            hosts.push(Host {
                ns: format!("{tag}-{name}"),
                ip,
            });
        }
        let mut net = Network {
            tag,
            subnet,
            gateway,
            hosts,
            made: Vec::new(),
        };
        // Leftovers of a run with the same pid (killed with SIGKILL).
        let mut stale: Vec<String> = net.hosts.iter().map(|h| h.ns.clone()).collect();
        stale.push(net.link_ns());
        net.made = stale;
        net.teardown_quietly();
        net.made.clear();
        check_free(subnet)?;
        // On error, drop(net) removes what was made.
        net.build()?;
        Ok(net)
    }

    /// The namespace holding the bridge.
    fn link_ns(&self) -> String {
        format!("{}-net", self.tag)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let link = self.link_ns();
        let prefix = self.subnet.prefix();
        self.add_ns(&link)?;
        ip(&["-n", &link, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &link, "link", "set", "br0", "up"])?;
        // The root namespace's leg.
        ip(&[
            "link", "add", &self.tag, "type", "veth", "peer", "name", "uplink", "netns", &link,
        ])?;
        ip(&["-n", &link, "link", "set", "uplink", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/{prefix}", self.gateway),
            "dev",
            &self.tag,
        ])?;
        ip(&["link", "set", &self.tag, "up"])?;
        for (k, host) in self.hosts.clone().iter().enumerate() {
            let ns = &host.ns;
            let port = format!("p{k}");
            self.add_ns(ns)?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &link, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", &link, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/{prefix}", host.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "route", "add", VIP_RANGE, "dev", "eth0"])?;
            let etc = etc_dir(ns);
            std::fs::create_dir_all(&etc)
                .and_then(|()| {
                    std::fs::write(
                        etc.join("resolv.conf"),
                        format!("nameserver {}\n", self.gateway),
                    )
                })
                .with_context(|| format!("writing {}/resolv.conf", etc.display()))?;
        }
        Ok(())
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        self.made.push(ns.to_owned());
        Ok(())
    }

    /// Kills (SIGKILL) whatever still runs in the hosts: a sidecar whose
    /// `meshwork run` was killed, say.
    pub(crate) fn kill_leftovers(&self) {
        for ns in &self.made {
            kill_all(ns);
        }
    }

    /// Kills what still runs in the hosts, deletes them and the root veth;
    /// warns about what it could not remove.
    pub(crate) fn teardown(&mut self) {
        for problem in self.teardown_quietly() {
            eprintln!("meshwork demo: {problem}");
        }
    }

    /// [`Self::teardown`], returning the problems instead of printing them.
    fn teardown_quietly(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let exists = |ns: &str| std::path::Path::new("/run/netns").join(ns).exists();
        for ns in &self.made {
            if !exists(ns) {
                let _ = std::fs::remove_dir_all(etc_dir(ns));
                continue;
            }
            kill_all(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                problems.push(format!(
                    "could not delete network namespace {ns} ({e:#}); remove it with `ip netns del {ns}`"
                ));
            }
            let _ = std::fs::remove_dir_all(etc_dir(ns));
        }
        self.made.clear();
        // Gone with its peer's namespace, normally; the kernel tears
        // namespaces down asynchronously, so it may also vanish between the
        // check and the delete.
        let gone = || {
            !std::path::Path::new("/sys/class/net")
                .join(&self.tag)
                .exists()
        };
        if !gone() {
            if let Err(e) = ip(&["link", "del", &self.tag]) {
                if !gone() {
                    problems.push(format!(
                        "could not delete interface {} ({e:#}); remove it with `ip link del {}`",
                        self.tag, self.tag
                    ));
                }
            }
        }
        problems
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// SIGKILL to every process in `ns`.
fn kill_all(ns: &str) {
    if let Ok(out) = quiet("ip", &["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = quiet("kill", &["-9", pid]).status();
        }
    }
}

/// Where `ip netns exec` finds the host's own /etc files.
fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

fn quiet(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `ip ARGS`, which must succeed.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = quiet("ip", args).output().map_err(|e| {
        anyhow!("cannot run `ip` ({e}); the transparent demo needs iproute2 (`ip`)")
    })?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Refuses a subnet the root namespace already uses (an address or a route
/// other than the default one).
fn check_free(subnet: Subnet) -> anyhow::Result<()> {
    let read = |args: &[&str]| -> anyhow::Result<String> {
        let out = quiet("ip", args).output().map_err(|e| {
            anyhow!("cannot run `ip` ({e}); the transparent demo needs iproute2 (`ip`)")
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let addrs = read(&["-4", "-o", "addr", "show"])?;
    for line in addrs.lines() {
        let mut words = line.split_whitespace();
        let dev = words.nth(1).unwrap_or("?");
        if let Some(addr) = words.skip_while(|w| *w != "inet").nth(1) {
            if subnet.overlaps(addr) {
                bail!(
                    "subnet {subnet} overlaps {addr} on interface {dev}; pick another with \
                     --subnet (is another transparent demo running?)"
                );
            }
        }
    }
    let routes = read(&["-4", "route", "show"])?;
    for line in routes.lines() {
        let dest = line.split_whitespace().next().unwrap_or("default");
        if dest != "default" && subnet.overlaps(dest) {
            bail!(
                "subnet {subnet} overlaps the route `{}` of this machine; pick another with --subnet",
                line.trim()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn subnets_parse_and_overlap() {
        let s: Subnet = "10.77.93.0/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.77.93.0/24");
        assert_eq!(s.host(1), Some(Ipv4Addr::new(10, 77, 93, 1)));
        assert_eq!(s.host(254), Some(Ipv4Addr::new(10, 77, 93, 254)));
        assert_eq!(s.host(255), None);
        assert!(s.overlaps("10.0.0.0/8"));
        assert!(s.overlaps("10.77.93.7"));
        assert!(s.overlaps("10.77.93.128/25"));
        assert!(!s.overlaps("10.77.94.0/24"));
        assert!(!s.overlaps("192.0.2.2/24"));
        assert!(!s.overlaps("fe80::1/64"));
        assert!("10.77.93.1/24"
            .parse::<Subnet>()
            .unwrap_err()
            .contains("10.77.93.0/24"));
        assert!("10.77.93.0/29".parse::<Subnet>().is_err());
        assert!("10.77.93.0".parse::<Subnet>().is_err());
        assert!("nope/24".parse::<Subnet>().is_err());
        let small: Subnet = "10.1.2.16/28".parse().unwrap();
        assert_eq!(small.host(14), Some(Ipv4Addr::new(10, 1, 2, 30)));
        assert_eq!(small.host(15), None);
    }
}
