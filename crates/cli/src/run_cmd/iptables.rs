//! The nat rules of transparent capture: what `meshwork run` installs in the
//! network namespace it runs in, and how it removes them.
//!
//! Three chains, one per purpose, each jumped to from a built-in chain:
//! - `MESHWORK_OUTPUT` (from `OUTPUT`, TCP): the application's outbound
//!   connections go to the sidecar's outbound capture port, except the
//!   proxy's own (its gid), loopback destinations, excluded ports and
//!   CIDRs.
//! - `MESHWORK_INBOUND` (from `PREROUTING`, TCP): connections to the
//!   application's ports go to the sidecar's inbound port.
//! - `MESHWORK_DNS` (from `OUTPUT`, UDP and TCP port 53): queries go to
//!   the sidecar's DNS server, except the proxy's own (its forwarding).
//!
//! IPv6 (`ip6tables`) gets the same chains: REDIRECT sends outbound
//! connections to `[::1]:<outbound port>`, DNS queries to an IPv6
//! nameserver to `[::1]:<DNS port>`, and inbound connections to an IPv6
//! address of the incoming interface, which the sidecar takes on its IPv6
//! twins (`[::1]`, `[::]`: the listeners' `additional_addresses`, see
//! `api::translate::capture`, and the DNS server's own, see `proxy::dns`).
//! Excluded CIDRs go to the rules of their own family. Link-local
//! destinations (`fe80::/10`) are captured like any other, so an
//! application cannot reach its link-local neighbours around the sidecar;
//! their passthrough fails (closed), as their original destination comes
//! back without the interface (scope) a connect to it needs. Exempting them
//! is the user's choice: `--exclude-cidrs fe80::/10`.
//!
//! The rules are plain data ([`install_commands`], [`removal_commands`]),
//! applied with `iptables` / `ip6tables`. Installing first removes whatever
//! a previous run left behind (a crashed run cannot remove its rules), so it
//! is idempotent; the catch is that two `meshwork run` in one network
//! namespace would fight over the chains, as two sidecars in one pod would.
//!
//! Non-goals: nftables-native rules (iptables-nft covers nft hosts), the
//! mangle/TPROXY mode (REDIRECT is enough when the application need not see
//! the original source address).

use std::fmt;
use std::net::IpAddr;
use std::process::Command;

/// Prefix of every chain this module creates.
const PREFIX: &str = "MESHWORK_";
const OUTPUT: &str = "MESHWORK_OUTPUT";
const INBOUND: &str = "MESHWORK_INBOUND";
const DNS: &str = "MESHWORK_DNS";
/// `-m multiport` takes at most this many ports.
const MULTIPORT_MAX: usize = 15;

/// What to capture.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Traffic of this gid (the proxy's) is never redirected.
    pub proxy_gid: u32,
    /// The sidecar's outbound capture port (15001).
    pub outbound_port: u16,
    /// The sidecar's inbound port (15006).
    pub inbound_port: u16,
    /// Inbound TCP to these goes to `inbound_port`; none: no inbound capture.
    pub app_ports: Vec<u16>,
    /// DNS (port 53) goes to this port; `None`: DNS is not captured.
    pub dns_port: Option<u16>,
    /// Outbound TCP to these destination ports is not redirected.
    pub exclude_ports: Vec<u16>,
    /// Outbound TCP to these destinations is not redirected.
    pub exclude_cidrs: Vec<Cidr>,
}

/// `iptables` (IPv4) or `ip6tables` (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// An address block, `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// A command that failed, with what it said.
#[derive(Debug)]
pub struct Error {
    command: String,
    reason: String,
}

/// The rules of the families they were installed for; removed on drop, so
/// every way out of `meshwork run` (an error, a panic) takes them away.
#[derive(Debug)]
pub struct Installed {
    families: Vec<Family>,
}

impl Family {
    pub fn tool(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    fn holds(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (Self::V4, IpAddr::V4(_)) | (Self::V6, IpAddr::V6(_))
        )
    }
}

impl Cidr {
    /// Parses `ip/len` or `ip`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected a CIDR like 10.0.0.0/8 or an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.trim().parse::<u8>() {
                Ok(l) if l <= max => l,
                _ => return Err(format!("{s:?}: the prefix length must be 0..={max}")),
            },
        };
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed: {}", self.command, self.reason)
    }
}

impl std::error::Error for Error {}

/// Whether `family`'s tool exists and may change the nat table here (root,
/// or CAP_NET_ADMIN, and a kernel with nat). `Err` says why not.
pub fn usable(family: Family) -> Result<(), Error> {
    run(family, &["-S", "OUTPUT"]).map(drop)
}

/// Installs `plan` for each family, replacing stale rules first. On an error
/// whatever was installed is removed again.
pub fn install(plan: &Plan, families: &[Family]) -> Result<Installed, Error> {
    let installed = Installed {
        families: families.to_vec(),
    };
    for &family in families {
        remove(family)?;
        for args in install_commands(plan, family) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            // On error `installed` is dropped, removing everything so far.
            run(family, &args)?;
        }
    }
    Ok(installed)
}

/// Removes every `MESHWORK_*` chain of the nat table and every jump to one.
pub fn remove(family: Family) -> Result<(), Error> {
    let listing = run(family, &["-S"])?;
    let mut first_error = None;
    for args in removal_commands(&listing) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Keep going: remove as much as possible, report the first failure.
        if let Err(e) = run(family, &args) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Drop for Installed {
    fn drop(&mut self) {
        for &family in &self.families {
            if let Err(e) = remove(family) {
                eprintln!("meshwork run: removing the {} capture rules: {e}; remove them by hand (`{} -t nat -S | grep {PREFIX}`)", family.tool(), family.tool());
            }
        }
    }
}

/// The arguments (after `-t nat`) that install `plan`: chains and their
/// rules first, the jumps into them last, so no packet meets a half-built
/// chain.
pub fn install_commands(plan: &Plan, family: Family) -> Vec<Vec<String>> {
    let mut cmds: Vec<Vec<String>> = Vec::new();
    let mut add = |args: &[&str]| cmds.push(args.iter().map(|a| (*a).to_owned()).collect());
    let gid = plan.proxy_gid.to_string();
    let out_port = plan.outbound_port.to_string();
    let in_port = plan.inbound_port.to_string();
    let dns_port = plan.dns_port.map(|p| p.to_string());

    if let Some(dns_port) = &dns_port {
        add(&["-N", DNS]);
        // The proxy forwards non-mesh names to the real resolver.
        add(&[
            "-A",
            DNS,
            "-m",
            "owner",
            "--gid-owner",
            &gid,
            "-j",
            "RETURN",
        ]);
        for proto in ["udp", "tcp"] {
            add(&[
                "-A",
                DNS,
                "-p",
                proto,
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-ports",
                dns_port,
            ]);
        }
    }

    add(&["-N", OUTPUT]);
    // The proxy's own connections (to upstreams, passthrough) go out as they are.
    add(&[
        "-A",
        OUTPUT,
        "-m",
        "owner",
        "--gid-owner",
        &gid,
        "-j",
        "RETURN",
    ]);
    add(&["-A", OUTPUT, "-d", family.loopback(), "-j", "RETURN"]);
    for ports in plan.exclude_ports.chunks(MULTIPORT_MAX) {
        let list = join(ports);
        add(&[
            "-A",
            OUTPUT,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            &list,
            "-j",
            "RETURN",
        ]);
    }
    for cidr in plan.exclude_cidrs.iter().filter(|c| family.holds(c.addr)) {
        add(&["-A", OUTPUT, "-d", &cidr.to_string(), "-j", "RETURN"]);
    }
    add(&[
        "-A",
        OUTPUT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &out_port,
    ]);

    if !plan.app_ports.is_empty() {
        add(&["-N", INBOUND]);
        for ports in plan.app_ports.chunks(MULTIPORT_MAX) {
            let list = join(ports);
            add(&[
                "-A",
                INBOUND,
                "-p",
                "tcp",
                "-m",
                "multiport",
                "--dports",
                &list,
                "-j",
                "REDIRECT",
                "--to-ports",
                &in_port,
            ]);
        }
    }

    // The jumps: DNS before the TCP capture, so TCP 53 reaches the DNS server.
    if dns_port.is_some() {
        for proto in ["udp", "tcp"] {
            add(&["-A", "OUTPUT", "-p", proto, "--dport", "53", "-j", DNS]);
        }
    }
    add(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT]);
    if !plan.app_ports.is_empty() {
        add(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND]);
    }
    cmds
}

/// The arguments that remove what `listing` (`iptables -t nat -S`) shows
/// of ours: the jumps into `MESHWORK_*` chains, then the chains.
pub fn removal_commands(listing: &str) -> Vec<Vec<String>> {
    let mut jumps = Vec::new();
    let mut chains = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["-N", chain] if chain.starts_with(PREFIX) => chains.push((*chain).to_owned()),
            ["-A", chain, rest @ ..] if !chain.starts_with(PREFIX) => {
                let jumps_to_ours = rest
                    .windows(2)
                    .any(|w| w[0] == "-j" && w[1].starts_with(PREFIX));
                if jumps_to_ours {
                    let mut cmd = vec!["-D".to_owned(), (*chain).to_owned()];
                    cmd.extend(rest.iter().map(|w| (*w).to_owned()));
                    jumps.push(cmd);
                }
            }
            _ => {}
        }
    }
    let mut cmds = jumps;
    cmds.extend(chains.iter().map(|c| vec!["-F".to_owned(), c.clone()]));
    cmds.extend(chains.into_iter().map(|c| vec!["-X".to_owned(), c]));
    cmds
}

/// `80,443`: a port list for iptables `multiport` and the sidecar's flags.
pub(super) fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `<tool> -w -t nat ARGS`; its stdout, or why it failed.
fn run(family: Family, args: &[&str]) -> Result<String, Error> {
    let tool = family.tool();
    let command = format!("{tool} -t nat {}", args.join(" "));
    let out = Command::new(tool)
        // -w: wait for the xtables lock instead of failing (iptables-legacy).
        .args(["-w", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|e| Error {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error {
            command,
            reason: format!("{} ({})", stderr.trim(), out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            app_ports: vec![8080],
            dns_port: Some(15053),
            exclude_ports: vec![22, 5432],
            exclude_cidrs: vec![
                Cidr::parse("10.0.0.0/8").unwrap(),
                Cidr::parse("fd00::/8").unwrap(),
            ],
        }
    }

    fn lines(cmds: &[Vec<String>]) -> Vec<String> {
        cmds.iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn ipv4_rules_exempt_the_proxy_and_jump_last() {
        let got = lines(&install_commands(&plan(), Family::V4));
        let want = [
            "-N MESHWORK_DNS",
            "-A MESHWORK_DNS -m owner --gid-owner 1337 -j RETURN",
            "-A MESHWORK_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053",
            "-A MESHWORK_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
            "-N MESHWORK_OUTPUT",
            "-A MESHWORK_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A MESHWORK_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A MESHWORK_OUTPUT -p tcp -m multiport --dports 22,5432 -j RETURN",
            "-A MESHWORK_OUTPUT -d 10.0.0.0/8 -j RETURN",
            "-A MESHWORK_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
            "-N MESHWORK_INBOUND",
            "-A MESHWORK_INBOUND -p tcp -m multiport --dports 8080 -j REDIRECT --to-ports 15006",
            "-A OUTPUT -p udp --dport 53 -j MESHWORK_DNS",
            "-A OUTPUT -p tcp --dport 53 -j MESHWORK_DNS",
            "-A OUTPUT -p tcp -j MESHWORK_OUTPUT",
            "-A PREROUTING -p tcp -j MESHWORK_INBOUND",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn ipv6_link_local_is_captured_unless_excluded() {
        let output = |plan: &Plan| -> Vec<String> {
            lines(&install_commands(plan, Family::V6))
                .into_iter()
                .filter(|l| l.starts_with("-A MESHWORK_OUTPUT"))
                .collect()
        };
        // Nothing lets link-local destinations around the sidecar by default.
        let got = output(&plan());
        assert!(!got.iter().any(|l| l.contains("fe80")), "{got:?}");
        assert_eq!(
            got.last().map(String::as_str),
            Some("-A MESHWORK_OUTPUT -p tcp -j REDIRECT --to-ports 15001")
        );
        // The user's opt-out, before the redirect.
        let mut p = plan();
        p.exclude_cidrs.push(Cidr::parse("fe80::/10").unwrap());
        let got = output(&p);
        let at = got
            .iter()
            .position(|l| l == "-A MESHWORK_OUTPUT -d fe80::/10 -j RETURN")
            .unwrap_or_else(|| panic!("no fe80::/10 exemption: {got:?}"));
        assert_eq!(at, got.len() - 2, "{got:?}");
    }

    #[test]
    fn ipv6_rules_have_their_own_loopback_and_cidrs_and_capture_dns_too() {
        let got = lines(&install_commands(&plan(), Family::V6));
        let want = [
            "-N MESHWORK_DNS",
            "-A MESHWORK_DNS -m owner --gid-owner 1337 -j RETURN",
            "-A MESHWORK_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053",
            "-A MESHWORK_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
            "-N MESHWORK_OUTPUT",
            "-A MESHWORK_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A MESHWORK_OUTPUT -d ::1/128 -j RETURN",
            "-A MESHWORK_OUTPUT -p tcp -m multiport --dports 22,5432 -j RETURN",
            "-A MESHWORK_OUTPUT -d fd00::/8 -j RETURN",
            "-A MESHWORK_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
            "-N MESHWORK_INBOUND",
            "-A MESHWORK_INBOUND -p tcp -m multiport --dports 8080 -j REDIRECT --to-ports 15006",
            "-A OUTPUT -p udp --dport 53 -j MESHWORK_DNS",
            "-A OUTPUT -p tcp --dport 53 -j MESHWORK_DNS",
            "-A OUTPUT -p tcp -j MESHWORK_OUTPUT",
            "-A PREROUTING -p tcp -j MESHWORK_INBOUND",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn no_app_ports_no_inbound_chain_and_many_ports_are_split() {
        let mut p = plan();
        p.app_ports.clear();
        p.dns_port = None;
        p.exclude_ports = (1..=20).collect();
        let v6 = lines(&install_commands(&p, Family::V6));
        assert!(v6.iter().all(|l| !l.contains("DNS")), "{v6:#?}");
        let got = lines(&install_commands(&p, Family::V4));
        assert!(got
            .iter()
            .all(|l| !l.contains("INBOUND") && !l.contains("DNS")));
        let multiport: Vec<_> = got.iter().filter(|l| l.contains("multiport")).collect();
        assert_eq!(multiport.len(), 2, "{got:#?}");
        assert!(
            multiport[1].contains("--dports 16,17,18,19,20 "),
            "{got:#?}"
        );
    }

    #[test]
    fn removal_takes_jumps_then_chains_and_leaves_the_rest() {
        let listing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N DOCKER\n-N MESHWORK_OUTPUT\n-N MESHWORK_DNS\n\
                       -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
                       -A OUTPUT -p udp -m udp --dport 53 -j MESHWORK_DNS\n\
                       -A OUTPUT -p tcp -j MESHWORK_OUTPUT\n\
                       -A MESHWORK_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n";
        let got = lines(&removal_commands(listing));
        assert_eq!(
            got,
            [
                "-D OUTPUT -p udp -m udp --dport 53 -j MESHWORK_DNS",
                "-D OUTPUT -p tcp -j MESHWORK_OUTPUT",
                "-F MESHWORK_OUTPUT",
                "-F MESHWORK_DNS",
                "-X MESHWORK_OUTPUT",
                "-X MESHWORK_DNS",
            ]
        );
        assert!(removal_commands("-P OUTPUT ACCEPT\n").is_empty());
    }

    #[test]
    fn cidrs_parse_with_or_without_a_length() {
        assert_eq!(
            Cidr::parse("10.1.0.0/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(
            Cidr::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            Cidr::parse("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
    }
}
