//! Listener -> [`model::Listener`]: address, HTTP detection, filter chains,
//! HttpConnectionManager and TcpProxy.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_rbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;

use super::route::route_configuration;
use super::{
    ads_source, decode, decode_only, is_default, is_type, opt_duration, single_cluster,
    socket_address, unsupported_type, At, FieldError, Res,
};
use crate::authz::Authz;
use crate::config::model::{self, HeaderMods, WeightedCluster};

/// The network filter of one filter chain.
enum NetworkFilter {
    Http(model::HttpConnectionManager),
    Tcp(model::TcpProxy),
}

/// HTTP/1.0 is accepted alongside the two required values: meshwork serves
/// it with its HTTP/1.1 codec, as Envoy's HCM does.
const HTTP_PROTOCOLS: [&str; 3] = ["http/1.1", "h2c", "http/1.0"];
/// ALPN values a TLS chain may match for HTTP.
const TLS_HTTP_PROTOCOLS: [&str; 2] = ["h2", "http/1.1"];

#[allow(deprecated)]
pub(super) fn listener(l: &lpb::Listener, env: &super::Env) -> Res<Option<model::Listener>> {
    let lpb::Listener {
        name,
        address,
        additional_addresses,
        // Ignored: names of stats, metadata for other filters, Envoy-internal
        // tuning that no client can observe.
        stat_prefix: _,
        stats_matcher: _,
        filter_chains,
        fcds_config,
        filter_chain_matcher,
        use_original_dst,
        default_filter_chain,
        per_connection_buffer_limit_bytes: _,
        per_connection_buffer_high_watermark_timeout: _,
        metadata,
        deprecated_v1,
        drain_type: _,
        listener_filters,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        transparent,
        freebind,
        socket_options,
        tcp_fast_open_queue_length: _,
        traffic_direction: _,
        udp_listener_config,
        api_listener,
        connection_balance_config,
        reuse_port: _,
        enable_reuse_port: _,
        access_log,
        tcp_backlog_size: _,
        max_connections_to_accept_per_socket_event: _,
        bind_to_port,
        enable_mptcp,
        ignore_global_conn_limit: _,
        bypass_overload_manager: _,
        tcp_keepalive,
        listener_specifier,
    } = l;
    // Envoy does not add an api_listener received over LDS (only one, from
    // bootstrap, is allowed): gRPC clients' listeners are skipped the same way.
    if api_listener.is_some() {
        return Ok(None);
    }
    deny!(
        fcds_config,
        filter_chain_matcher,
        deprecated_v1,
        transparent,
        freebind,
        socket_options,
        udp_listener_config,
        connection_balance_config,
        access_log,
        enable_mptcp,
        tcp_keepalive,
        listener_specifier,
    );
    let address = socket_address(address).at("address")?;
    let additional_addresses = additional_addresses
        .iter()
        .enumerate()
        .map(|(i, a)| additional_address(a, address).at(format!("additional_addresses[{i}]")))
        .collect::<Res<Vec<_>>>()?;
    // Port 0 (any free port) may repeat, as in Envoy.
    if let Some(i) = (1..additional_addresses.len()).find(|&i| {
        additional_addresses[i].port() != 0
            && additional_addresses[..i].contains(&additional_addresses[i])
    }) {
        return Err(FieldError::new(
            format!("additional_addresses[{i}]"),
            format!("{} is listed twice", additional_addresses[i]),
        ));
    }
    let use_original_dst = use_original_dst.as_ref().is_some_and(|b| b.value);
    let bind_to_port = bind_to_port.as_ref().is_none_or(|b| b.value);
    if use_original_dst && !bind_to_port {
        return Err(FieldError::new(
            "bind_to_port",
            "a use_original_dst listener must be bound (it is where connections are redirected)",
        ));
    }
    if use_original_dst && address.port() == 0 {
        return Err(FieldError::new(
            "address",
            "a use_original_dst listener needs a fixed port (its chains match destination_port)",
        ));
    }
    if use_original_dst {
        if let Some((i, a)) = additional_addresses
            .iter()
            .enumerate()
            .find(|(_, a)| a.port() != address.port())
        {
            return Err(FieldError::new(
                format!("additional_addresses[{i}]"),
                format!(
                    "port {} differs from the address's {} (a use_original_dst listener's chains match its one destination_port)",
                    a.port(),
                    address.port()
                ),
            ));
        }
    }
    let service = match metadata {
        Some(m) => listener_metadata(m).at("metadata")?,
        None => None,
    };

    let (mut inspector, mut tls_inspector) = (false, false);
    for (i, lf) in listener_filters.iter().enumerate() {
        let kind = listener_filter(lf).at(format_args!("listener_filters[{i}]"))?;
        let (seen, what) = match kind {
            ListenerFilterKind::Http => (std::mem::replace(&mut inspector, true), "http"),
            ListenerFilterKind::Tls => (std::mem::replace(&mut tls_inspector, true), "tls"),
        };
        if seen {
            return Err(FieldError::new(
                format!("listener_filters[{i}]"),
                format!("{what}_inspector listed twice"),
            ));
        }
    }

    // Classify the chains: at most one matching the sniffed HTTP protocols,
    // at most one matching everything (Envoy refuses duplicate matchers);
    // with TLS, at most one TLS chain matching HTTP ALPN values and one for
    // the rest of TLS.
    let mut http: Option<(usize, model::HttpConnectionManager)> = None;
    let mut catch_all: Option<(usize, NetworkFilter)> = None;
    let mut tls_http: Option<(
        usize,
        model::HttpConnectionManager,
        Vec<String>,
        Vec<String>,
    )> = None;
    let mut tls_tcp: Option<(usize, model::TcpProxy, Vec<String>)> = None;
    for (i, fc) in filter_chains.iter().enumerate() {
        let at = format!("filter_chains[{i}]");
        let chain = filter_chain(fc, env).at(&at)?;
        own_port_only(chain.destination_port, use_original_dst, address.port())
            .at(format!("{at}.filter_chain_match"))?;
        if chain.transport == Transport::Tls && !tls_inspector {
            return Err(FieldError::new(
                format!("{at}.filter_chain_match.transport_protocol"),
                "requires the envoy.filters.listener.tls_inspector listener filter",
            ));
        }
        if let Some(alpn) = chain.tls {
            let same = |first: usize| {
                FieldError::new(
                    format!("{at}.filter_chain_match"),
                    format!("same match as filter_chains[{first}]"),
                )
            };
            match (chain.filter, chain.http_alpn.is_empty()) {
                (NetworkFilter::Http(h), false) => {
                    if let Some((first, ..)) = tls_http {
                        return Err(same(first));
                    }
                    tls_http = Some((i, h, chain.http_alpn, alpn));
                }
                (NetworkFilter::Tcp(t), true) => {
                    if let Some((first, ..)) = tls_tcp {
                        return Err(same(first));
                    }
                    tls_tcp = Some((i, t, alpn));
                }
                (NetworkFilter::Http(_), true) => {
                    return Err(FieldError::new(
                        format!("{at}.filter_chain_match.application_protocols"),
                        "a TLS chain holding http_connection_manager must match application_protocols [h2, http/1.1]",
                    ))
                }
                (NetworkFilter::Tcp(_), false) => {
                    return Err(FieldError::new(
                        format!("{at}.filters"),
                        "a TLS chain matching HTTP application_protocols must hold http_connection_manager",
                    ))
                }
            }
            continue;
        }
        if chain.transport == Transport::Raw && !tls_inspector {
            return Err(FieldError::new(
                format!("{at}.filter_chain_match.transport_protocol"),
                "requires the envoy.filters.listener.tls_inspector listener filter",
            ));
        }
        let (matches_http, filter) = (chain.matches_http, chain.filter);
        if matches_http {
            if !inspector {
                return Err(FieldError::new(
                    format!("{at}.filter_chain_match.application_protocols"),
                    "requires the envoy.filters.listener.http_inspector listener filter",
                ));
            }
            let NetworkFilter::Http(h) = filter else {
                return Err(FieldError::new(
                    format!("{at}.filters[0]"),
                    "a chain matching HTTP protocols must hold http_connection_manager",
                ));
            };
            if let Some((first, _)) = http {
                return Err(FieldError::new(
                    format!("{at}.filter_chain_match"),
                    format!("same match as filter_chains[{first}]"),
                ));
            }
            http = Some((i, h));
        } else {
            if let Some((first, _)) = catch_all {
                return Err(FieldError::new(
                    at,
                    format!(
                        "a second chain without filter_chain_match (first: filter_chains[{first}])"
                    ),
                ));
            }
            if inspector && matches!(filter, NetworkFilter::Http(_)) {
                return Err(FieldError::new(
                    format!("{at}.filters[0]"),
                    "with http_inspector, http_connection_manager must be in a chain matching application_protocols [http/1.1, h2c]",
                ));
            }
            catch_all = Some((i, filter));
        }
    }
    let default_chain = match default_filter_chain {
        None => None,
        Some(fc) => {
            let chain = filter_chain(fc, env).at("default_filter_chain")?;
            let (matches_http, filter) = (chain.matches_http, chain.filter);
            if matches_http
                || chain.transport != Transport::Any
                || chain.tls.is_some()
                || chain.destination_port.is_some()
            {
                return Err(FieldError::new(
                    "default_filter_chain.filter_chain_match",
                    "must not be set",
                ));
            }
            let NetworkFilter::Tcp(t) = filter else {
                return Err(FieldError::new(
                    "default_filter_chain.filters[0]",
                    "the default chain must hold tcp_proxy",
                ));
            };
            if let Some((i, _)) = catch_all.as_ref().filter(|_| !use_original_dst) {
                return Err(FieldError::new(
                    "default_filter_chain",
                    format!("unreachable: filter_chains[{i}] already matches every connection"),
                ));
            }
            Some(t)
        }
    };

    // With use_original_dst, the default chain is for captured connections
    // only (the listener's own chains all match its destination_port).
    let (captured_default, default_chain) = if use_original_dst {
        (default_chain, None)
    } else {
        (None, default_chain)
    };
    let (mut http, mut tcp) = (http.map(|(_, h)| h), default_chain);
    match catch_all {
        Some((_, NetworkFilter::Tcp(t))) => tcp = Some(t),
        Some((_, NetworkFilter::Http(h))) => http = Some(h),
        None => {}
    }
    let tls = match (tls_http, tls_tcp) {
        (None, None) => None,
        (h, t) => {
            let mut alpn: Vec<String> = Vec::new();
            for a in h
                .iter()
                .flat_map(|(_, _, _, a)| a)
                .chain(t.iter().flat_map(|(_, _, a)| a))
            {
                if !alpn.contains(a) {
                    alpn.push(a.clone());
                }
            }
            let identity = super::tls::require_identity(env).at("filter_chains")?;
            let protocols: Vec<&[u8]> = alpn.iter().map(|a| a.as_bytes()).collect();
            let server = identity
                .mesh_server_config(&protocols)
                .map_err(|e| FieldError::new("filter_chains", e.to_string()))?;
            let (http, http_alpn) = match h {
                Some((_, h, m, _)) => (Some(h), m),
                None => (None, Vec::new()),
            };
            Some(Arc::new(model::ListenerTls {
                alpn,
                http,
                http_alpn,
                tcp: t.map(|(_, t, _)| t),
                server,
            }))
        }
    };
    if http.is_none() && tcp.is_none() && tls.is_none() && captured_default.is_none() {
        return Err(FieldError::new(
            "filter_chains",
            "at least one filter chain (or default_filter_chain) is required",
        ));
    }

    let detect_timeout = if inspector || tls_inspector {
        let timeout = opt_duration(listener_filters_timeout, "listener_filters_timeout")?
            // Envoy's default.
            .unwrap_or(Duration::from_secs(15));
        if timeout.is_zero() {
            return Err(FieldError::new(
                "listener_filters_timeout",
                "0 (no timeout) is not supported: protocol detection must be bounded",
            ));
        }
        if tcp.is_some() && !*continue_on_listener_filters_timeout {
            return Err(FieldError::new(
                "continue_on_listener_filters_timeout",
                "must be true: connections that time out in detection go to the default chain",
            ));
        }
        Some(timeout)
    } else {
        // Without listener filters Envoy ignores both fields.
        None
    };

    Ok(Some(model::Listener {
        name: name.clone(),
        address,
        additional_addresses,
        detect_timeout,
        http,
        tcp,
        tls,
        use_original_dst,
        captured_default,
        bind_to_port,
        service,
    }))
}

/// One `additional_addresses` entry: a TCP socket address other than the
/// listener's `address`, without socket option overrides.
fn additional_address(
    a: &lpb::AdditionalAddress,
    primary: std::net::SocketAddr,
) -> Res<std::net::SocketAddr> {
    let lpb::AdditionalAddress {
        address,
        socket_options,
        tcp_keepalive,
    } = a;
    deny!(socket_options, tcp_keepalive);
    let addr = socket_address(address).at("address")?;
    if addr == primary && addr.port() != 0 {
        return Err(FieldError::new(
            "address",
            format!("{addr} is already the listener's address"),
        ));
    }
    Ok(addr)
}

/// `filter_chain_match.destination_port`: only on a `use_original_dst`
/// listener, where every chain must match the listener's own port (its
/// chains serve connections addressed to it; captured ones go elsewhere).
fn own_port_only(port: Option<u32>, use_original_dst: bool, own: u16) -> Res<()> {
    match (port, use_original_dst) {
        (Some(p), true) if p == u32::from(own) => Ok(()),
        (None, false) => Ok(()),
        (Some(p), true) => Err(FieldError::new(
            "destination_port",
            format!("{p} is not the listener's port {own} (only the listener's own port is supported)"),
        )),
        (None, true) => Err(FieldError::new(
            "destination_port",
            format!("required on a use_original_dst listener: {own}, the listener's own port (captured connections take default_filter_chain)"),
        )),
        (Some(_), false) => Err(FieldError::new(
            "destination_port",
            "only supported on a use_original_dst listener",
        )),
    }
}

/// `metadata.filter_metadata["meshwork"]`: `service` (string) and
/// `hostnames` (list of strings); other namespaces belong to other software.
fn listener_metadata(m: &core::Metadata) -> Res<Option<Arc<model::ListenerService>>> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(fields) = m.filter_metadata.get("meshwork") else {
        return Ok(None);
    };
    let mut service = None;
    let mut hostnames = Vec::new();
    for (key, value) in &fields.fields {
        let at = format!("filter_metadata[\"meshwork\"].{key}");
        match (key.as_str(), &value.kind) {
            ("service", Some(Kind::StringValue(s))) => service = Some(s.clone()),
            ("hostnames", Some(Kind::ListValue(l))) => {
                for (i, v) in l.values.iter().enumerate() {
                    let Some(Kind::StringValue(h)) = &v.kind else {
                        return Err(FieldError::new(format!("{at}[{i}]"), "must be a string"));
                    };
                    hostnames.push(h.to_ascii_lowercase());
                }
            }
            ("service", _) => return Err(FieldError::new(at, "must be a string")),
            ("hostnames", _) => return Err(FieldError::new(at, "must be a list of strings")),
            _ => return Err(FieldError::new(at, "unknown meshwork metadata key")),
        }
    }
    let Some(service) = service else {
        return Err(FieldError::new(
            "filter_metadata[\"meshwork\"].service",
            "required",
        ));
    };
    Ok(Some(Arc::new(model::ListenerService {
        service,
        hostnames,
    })))
}

enum ListenerFilterKind {
    Http,
    Tls,
}

/// `filter_chain_match.transport_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Unset: any transport.
    Any,
    /// `raw_buffer` (needs tls_inspector).
    Raw,
    /// `tls` (needs tls_inspector and a TLS transport socket).
    Tls,
}

/// One classified filter chain.
struct Chain {
    transport: Transport,
    /// `filter_chain_match.destination_port`.
    destination_port: Option<u32>,
    /// Plaintext chain matching the sniffed HTTP protocols.
    matches_http: bool,
    /// TLS chain: the ALPN values it matches (`application_protocols`).
    http_alpn: Vec<String>,
    /// TLS chain: the ALPN values its DownstreamTlsContext offers.
    tls: Option<Vec<String>>,
    filter: NetworkFilter,
}

fn listener_filter(lf: &lpb::ListenerFilter) -> Res<ListenerFilterKind> {
    let lpb::ListenerFilter {
        name,
        filter_disabled,
        config_type,
    } = lf;
    deny!(filter_disabled);
    match config_type {
        Some(lpb::listener_filter::ConfigType::TypedConfig(any)) => {
            if is_type::<TlsInspector>(any) {
                let t = decode::<TlsInspector>(any).at("typed_config")?;
                let TlsInspector {
                    enable_ja3_fingerprinting,
                    enable_ja4_fingerprinting,
                    initial_read_buffer_size,
                    close_connection_on_client_hello_parsing_errors,
                    max_client_hello_size,
                } = &t;
                (|| {
                    deny!(
                        enable_ja3_fingerprinting,
                        enable_ja4_fingerprinting,
                        initial_read_buffer_size,
                        close_connection_on_client_hello_parsing_errors,
                        max_client_hello_size
                    );
                    Ok(())
                })()
                .at("typed_config")?;
                return Ok(ListenerFilterKind::Tls);
            }
            if !is_type::<HttpInspector>(any) {
                return Err(unsupported_type(any, name));
            }
            // HttpInspector has no fields; decoding still proves the bytes.
            decode::<HttpInspector>(any).at("typed_config")?;
            Ok(ListenerFilterKind::Http)
        }
        Some(lpb::listener_filter::ConfigType::ConfigDiscovery(_)) => {
            Err(FieldError::unsupported("config_discovery"))
        }
        None => Err(FieldError::new("typed_config", "required")),
    }
}

/// Classifies a chain: its transport, HTTP match, TLS context and filter.
#[allow(deprecated)]
fn filter_chain(fc: &lpb::FilterChain, env: &super::Env) -> Res<Chain> {
    let lpb::FilterChain {
        filter_chain_match,
        filters,
        use_proxy_proto,
        metadata: _,
        transport_socket,
        transport_socket_connect_timeout,
        name: _,
    } = fc;
    deny!(use_proxy_proto, transport_socket_connect_timeout);
    let (transport, matches_http, http_alpn) = match filter_chain_match {
        None => (Transport::Any, false, Vec::new()),
        Some(m) => filter_chain_match_http(m).at("filter_chain_match")?,
    };
    let destination_port = filter_chain_match
        .as_ref()
        .and_then(|m| m.destination_port.as_ref())
        .map(|p| p.value);
    let tls = match transport_socket {
        None => None,
        Some(ts) => match super::tls::transport_socket(ts, true).at("transport_socket")? {
            super::tls::Socket::Plaintext => None,
            super::tls::Socket::Downstream(ctx) => Some(
                super::tls::downstream_context(&ctx, env).at("transport_socket.typed_config")?,
            ),
            super::tls::Socket::Upstream(_) => {
                return Err(FieldError::new(
                    "transport_socket.typed_config",
                    "UpstreamTlsContext on a listener (use DownstreamTlsContext)",
                ))
            }
        },
    };
    match (transport, &tls) {
        (Transport::Tls, None) => {
            return Err(FieldError::new(
                "transport_socket",
                "a chain matching transport_protocol \"tls\" needs a TLS transport socket",
            ))
        }
        (Transport::Any | Transport::Raw, Some(_)) => {
            return Err(FieldError::new(
                "filter_chain_match.transport_protocol",
                "must be \"tls\" on a chain with a TLS transport socket",
            ))
        }
        _ => {}
    }
    if let Some(offered) = &tls {
        for a in &http_alpn {
            if !offered.contains(a) {
                return Err(FieldError::new(
                    "filter_chain_match.application_protocols",
                    format!(
                        "{a:?} is not offered by the chain's DownstreamTlsContext alpn_protocols"
                    ),
                ));
            }
        }
    }
    // RBAC filters (authorization), then one terminal filter.
    let Some((last, rbacs)) = filters.split_last() else {
        return Err(FieldError::new(
            "filters",
            "one terminal filter (http_connection_manager or tcp_proxy) is required",
        ));
    };
    let mut authz = Authz::default();
    for (i, f) in rbacs.iter().enumerate() {
        authz
            .filters
            .push(network_rbac_filter(f).at(format_args!("filters[{i}]"))?);
    }
    let mut filter = network_filter(last).at(format_args!("filters[{}]", rbacs.len()))?;
    if !rbacs.is_empty() {
        let NetworkFilter::Tcp(t) = &mut filter else {
            return Err(FieldError::new(
                "filters[0]",
                "network RBAC filters are only supported before tcp_proxy (HTTP chains authorize with envoy.filters.http.rbac)",
            ));
        };
        t.authz = Some(Arc::new(authz));
    }
    Ok(Chain {
        transport,
        destination_port,
        matches_http,
        http_alpn,
        tls,
        filter,
    })
}

/// Returns the transport, whether a plaintext chain matches the sniffed
/// HTTP protocols, and the ALPN values a TLS chain matches.
fn filter_chain_match_http(m: &lpb::FilterChainMatch) -> Res<(Transport, bool, Vec<String>)> {
    let lpb::FilterChainMatch {
        // Checked by the caller, which knows the listener.
        destination_port: _,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        server_names,
        transport_protocol,
        application_protocols,
    } = m;
    deny!(
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        server_names,
    );
    let transport = match transport_protocol.as_str() {
        "" => Transport::Any,
        "raw_buffer" => Transport::Raw,
        "tls" => Transport::Tls,
        other => {
            return Err(FieldError::new(
                "transport_protocol",
                format!("unsupported {other:?} (only tls and raw_buffer)"),
            ))
        }
    };
    if application_protocols.is_empty() {
        return Ok((transport, false, Vec::new()));
    }
    if transport == Transport::Tls {
        for (i, p) in application_protocols.iter().enumerate() {
            if !TLS_HTTP_PROTOCOLS.contains(&p.as_str()) {
                return Err(FieldError::new(
                    format!("application_protocols[{i}]"),
                    format!("unsupported value {p:?} on a TLS chain (expected h2, http/1.1)"),
                ));
            }
        }
        return Ok((transport, false, application_protocols.clone()));
    }
    for (i, p) in application_protocols.iter().enumerate() {
        if !HTTP_PROTOCOLS.contains(&p.as_str()) {
            return Err(FieldError::new(
                format!("application_protocols[{i}]"),
                format!("unsupported value {p:?} (expected http/1.1, h2c)"),
            ));
        }
    }
    for required in &HTTP_PROTOCOLS[..2] {
        if !application_protocols.iter().any(|p| p == required) {
            return Err(FieldError::new(
                "application_protocols",
                format!("must include {required:?}: meshwork detects HTTP/1.1 and h2c together"),
            ));
        }
    }
    Ok((transport, true, Vec::new()))
}

/// A network filter before the terminal one: only `envoy.filters.network.rbac`.
fn network_rbac_filter(f: &lpb::Filter) -> Res<crate::authz::RbacFilter> {
    let lpb::Filter { name, config_type } = f;
    let any = match config_type {
        Some(lpb::filter::ConfigType::TypedConfig(any)) => any,
        Some(lpb::filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(FieldError::unsupported("config_discovery"))
        }
        None => return Err(FieldError::new("typed_config", "required")),
    };
    let r: net_rbac::Rbac = decode_only(
        any,
        name,
        "only envoy.filters.network.rbac may come before the terminal filter",
    )?;
    super::rbac::network_filter(&r).at("typed_config")
}

fn network_filter(f: &lpb::Filter) -> Res<NetworkFilter> {
    let lpb::Filter { name, config_type } = f;
    let any = match config_type {
        Some(lpb::filter::ConfigType::TypedConfig(any)) => any,
        Some(lpb::filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(FieldError::unsupported("config_discovery"))
        }
        None => return Err(FieldError::new("typed_config", "required")),
    };
    if is_type::<hcm::HttpConnectionManager>(any) {
        let h = decode::<hcm::HttpConnectionManager>(any).at("typed_config")?;
        http_connection_manager(&h)
            .at("typed_config")
            .map(NetworkFilter::Http)
    } else if is_type::<tcp::TcpProxy>(any) {
        let t = decode::<tcp::TcpProxy>(any).at("typed_config")?;
        tcp_proxy(&t).at("typed_config").map(NetworkFilter::Tcp)
    } else {
        Err(unsupported_type(any, name))
    }
}

#[allow(deprecated)]
fn http_connection_manager(h: &hcm::HttpConnectionManager) -> Res<model::HttpConnectionManager> {
    use hcm::http_connection_manager::{CodecType, RouteSpecifier};
    let hcm::HttpConnectionManager {
        codec_type,
        stat_prefix,
        http_filters,
        add_user_agent,
        tracing,
        common_http_protocol_options,
        http1_safe_max_connection_duration,
        http_protocol_options,
        http2_protocol_options,
        http3_protocol_options,
        server_name,
        server_header_transformation,
        scheme_header_transformation,
        max_request_headers_kb,
        stream_idle_timeout,
        stream_flush_timeout,
        request_timeout,
        request_headers_timeout,
        // Envoy-internal connection draining/closing tuning.
        drain_timeout: _,
        drain_timeout_jitter: _,
        delayed_close_timeout: _,
        access_log,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options,
        use_remote_address,
        xff_num_trusted_hops,
        original_ip_detection_extensions,
        early_header_mutation_extensions,
        internal_address_config,
        skip_xff_append,
        via,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        forward_client_cert_details,
        set_current_client_cert_details,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        upgrade_configs,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        request_id_extension,
        local_reply_config,
        strip_matching_host_port,
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
        route_specifier,
        strip_port_mode,
    } = h;
    if *codec_type != CodecType::Auto as i32 {
        return Err(FieldError::new("codec_type", "only AUTO is supported"));
    }
    deny!(
        add_user_agent,
        tracing,
        http1_safe_max_connection_duration,
        http_protocol_options,
        http2_protocol_options,
        http3_protocol_options,
        server_name,
        server_header_transformation,
        scheme_header_transformation,
        max_request_headers_kb,
        stream_flush_timeout,
        request_headers_timeout,
        access_log,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options,
        use_remote_address,
        xff_num_trusted_hops,
        original_ip_detection_extensions,
        early_header_mutation_extensions,
        internal_address_config,
        skip_xff_append,
        via,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        forward_client_cert_details,
        set_current_client_cert_details,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        request_id_extension,
        local_reply_config,
        strip_matching_host_port,
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
        strip_port_mode,
    );

    // RBAC filters (authorization), the local rate limit, the fault filter,
    // then the router, last: the order the data path runs them in.
    let Some((router, before)) = http_filters.split_last() else {
        return Err(FieldError::new(
            "http_filters",
            "envoy.filters.http.router is required (last)",
        ));
    };
    router_filter(router).at(format_args!("http_filters[{}]", before.len()))?;
    let mut rbacs = Vec::new();
    let (mut rate_limit, mut fault) = (None, None);
    let mut last_stage = 0;
    for (i, f) in before.iter().enumerate() {
        let at = format!("http_filters[{i}]");
        let filter = http_filter(f).at(&at)?;
        let stage = filter.stage();
        if stage < last_stage || (stage == last_stage && stage > 0) {
            return Err(FieldError::new(
                at,
                "out of order or repeated: the filters before the router must be envoy.filters.http.rbac (any number), then at most one envoy.filters.http.local_ratelimit, then at most one envoy.filters.http.fault",
            ));
        }
        last_stage = stage;
        match filter {
            HttpFilter::Rbac(r) => rbacs.push(r),
            HttpFilter::RateLimit(l) => rate_limit = Some(Arc::new(l)),
            HttpFilter::Fault(f) => fault = Some(Arc::new(f)),
        }
    }
    let authz = (!rbacs.is_empty()).then(|| Arc::new(Authz { filters: rbacs }));

    let (route_config_name, inline_routes) = match route_specifier {
        Some(RouteSpecifier::Rds(hcm::Rds {
            config_source,
            route_config_name,
        })) => {
            ads_source(config_source).at("rds.config_source")?;
            if route_config_name.is_empty() {
                return Err(FieldError::new("rds.route_config_name", "required"));
            }
            (route_config_name.clone(), None)
        }
        Some(RouteSpecifier::RouteConfig(rc)) => {
            let table = route_configuration(rc).at("route_config")?;
            (rc.name.clone(), Some(Arc::new(table)))
        }
        Some(RouteSpecifier::ScopedRoutes(_)) => {
            return Err(FieldError::unsupported("scoped_routes"))
        }
        None => {
            return Err(FieldError::new(
                "route_specifier",
                "rds or route_config is required",
            ))
        }
    };

    // The stream idle timeout is enforced per request (a route's
    // `idle_timeout` overrides it); the others are not enforced by the data
    // path: refuse them rather than accept and ignore them.
    deny!(request_timeout, common_http_protocol_options);
    let stream_idle_timeout = super::opt_duration(stream_idle_timeout, "stream_idle_timeout")?;

    let mut websocket = false;
    for (i, u) in upgrade_configs.iter().enumerate() {
        let hcm::http_connection_manager::UpgradeConfig {
            upgrade_type,
            filters,
            enabled,
        } = u;
        (|| {
            if !upgrade_type.eq_ignore_ascii_case("websocket") {
                return Err(FieldError::new(
                    "upgrade_type",
                    format!("unsupported upgrade {upgrade_type:?} (only websocket)"),
                ));
            }
            deny!(filters);
            Ok(())
        })()
        .at(format_args!("upgrade_configs[{i}]"))?;
        websocket = enabled.as_ref().is_none_or(|e| e.value);
    }

    Ok(model::HttpConnectionManager {
        stat_prefix: stat_prefix.clone(),
        route_config_name,
        inline_routes,
        stream_idle_timeout,
        request_timeout: None,
        idle_timeout: None,
        websocket,
        authz,
        rate_limit,
        fault,
    })
}

/// An HTTP filter before the router.
enum HttpFilter {
    Rbac(crate::authz::RbacFilter),
    RateLimit(model::LocalRateLimit),
    Fault(model::Fault),
}

impl HttpFilter {
    /// Position in the required order (RBAC, rate limit, fault).
    fn stage(&self) -> u8 {
        match self {
            HttpFilter::Rbac(_) => 0,
            HttpFilter::RateLimit(_) => 1,
            HttpFilter::Fault(_) => 2,
        }
    }
}

/// An HTTP filter before the router: `envoy.filters.http.rbac`,
/// `envoy.filters.http.local_ratelimit` or `envoy.filters.http.fault`
/// (the latter two under their canonical names, which routes'
/// `typed_per_filter_config` keys refer to).
fn http_filter(f: &hcm::HttpFilter) -> Res<HttpFilter> {
    use super::http_filters::{http_fault, local_rate_limit, FAULT, LOCAL_RATELIMIT};
    let hcm::HttpFilter {
        name,
        is_optional,
        disabled,
        config_type,
    } = f;
    deny!(is_optional, disabled);
    let any = match config_type {
        Some(hcm::http_filter::ConfigType::TypedConfig(any)) => any,
        Some(hcm::http_filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(FieldError::unsupported("config_discovery"))
        }
        None => return Err(FieldError::new("typed_config", "required")),
    };
    let named = |canonical: &str| {
        if name != canonical {
            return Err(FieldError::new(
                "name",
                format!("must be {canonical:?} (routes' typed_per_filter_config refers to it by that name)"),
            ));
        }
        Ok(())
    };
    if is_type::<lrl::LocalRateLimit>(any) {
        named(LOCAL_RATELIMIT)?;
        let l = decode::<lrl::LocalRateLimit>(any).at("typed_config")?;
        return local_rate_limit(&l, false)
            .at("typed_config")
            .map(HttpFilter::RateLimit);
    }
    if is_type::<fault::HttpFault>(any) {
        named(FAULT)?;
        let h = decode::<fault::HttpFault>(any).at("typed_config")?;
        return http_fault(&h).at("typed_config").map(HttpFilter::Fault);
    }
    let r: http_rbac::Rbac = decode_only(
        any,
        name,
        "only envoy.filters.http.rbac, envoy.filters.http.local_ratelimit and envoy.filters.http.fault may come before envoy.filters.http.router",
    )?;
    super::rbac::http_filter(&r)
        .at("typed_config")
        .map(HttpFilter::Rbac)
}

/// `HttpProtocolOptions` where only `idle_timeout` may be set.
pub(super) fn common_protocol_idle_timeout(o: &core::HttpProtocolOptions) -> Res<Option<Duration>> {
    let core::HttpProtocolOptions {
        idle_timeout,
        max_connection_duration,
        max_connection_duration_jitter,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    } = o;
    deny!(
        max_connection_duration,
        max_connection_duration_jitter,
        max_headers_count,
        max_response_headers_kb,
        max_stream_duration,
        headers_with_underscores_action,
        max_requests_per_connection,
    );
    opt_duration(idle_timeout, "idle_timeout")
}

#[allow(deprecated)]
fn router_filter(f: &hcm::HttpFilter) -> Res<()> {
    let hcm::HttpFilter {
        name,
        is_optional,
        disabled,
        config_type,
    } = f;
    deny!(is_optional, disabled);
    let any = match config_type {
        Some(hcm::http_filter::ConfigType::TypedConfig(any)) => any,
        Some(hcm::http_filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(FieldError::unsupported("config_discovery"))
        }
        None => return Err(FieldError::new("typed_config", "required")),
    };
    if !is_type::<Router>(any) {
        return Err(unsupported_type(any, name));
    }
    let router = decode::<Router>(any).at("typed_config")?;
    let Router {
        dynamic_stats: _,
        start_child_span: _,
        upstream_log,
        upstream_log_options,
        // meshwork's proxy never adds x-envoy-* headers, which is what
        // suppress_envoy_headers asks for.
        suppress_envoy_headers: _,
        strict_check_headers,
        respect_expected_rq_timeout,
        suppress_grpc_request_failure_code_stats: _,
        upstream_http_filters,
        reject_connect_request_early_data,
    } = &router;
    (|| {
        deny!(
            upstream_log,
            upstream_log_options,
            strict_check_headers,
            respect_expected_rq_timeout,
            upstream_http_filters,
            reject_connect_request_early_data,
        );
        Ok(())
    })()
    .at("typed_config")
}

fn tcp_proxy(t: &tcp::TcpProxy) -> Res<model::TcpProxy> {
    use tcp::tcp_proxy::ClusterSpecifier;
    #[allow(deprecated)]
    let tcp::TcpProxy {
        stat_prefix,
        on_demand,
        metadata_match,
        idle_timeout,
        downstream_idle_timeout,
        upstream_idle_timeout,
        access_log,
        max_connect_attempts,
        backoff_options,
        hash_policy,
        tunneling_config,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
        access_log_flush_interval,
        flush_access_log_on_connected,
        access_log_options,
        proxy_protocol_tlvs,
        proxy_protocol_tlv_merge_policy,
        upstream_connect_mode,
        max_early_data_bytes,
        check_drain_close,
        cluster_specifier,
    } = t;
    deny!(
        on_demand,
        metadata_match,
        downstream_idle_timeout,
        upstream_idle_timeout,
        access_log,
        max_connect_attempts,
        backoff_options,
        hash_policy,
        tunneling_config,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
        access_log_flush_interval,
        flush_access_log_on_connected,
        access_log_options,
        proxy_protocol_tlvs,
        proxy_protocol_tlv_merge_policy,
        upstream_connect_mode,
        max_early_data_bytes,
        check_drain_close,
    );
    let clusters = match cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => {
            if name.is_empty() {
                return Err(FieldError::new("cluster", "must not be empty"));
            }
            vec![single_cluster(name)]
        }
        Some(ClusterSpecifier::WeightedClusters(tcp::tcp_proxy::WeightedCluster { clusters })) => {
            if clusters.is_empty() {
                return Err(FieldError::new(
                    "weighted_clusters.clusters",
                    "must not be empty",
                ));
            }
            let mut out = Vec::with_capacity(clusters.len());
            for (i, c) in clusters.iter().enumerate() {
                let tcp::tcp_proxy::weighted_cluster::ClusterWeight {
                    name,
                    weight,
                    metadata_match,
                } = c;
                (|| {
                    deny!(metadata_match);
                    if name.is_empty() {
                        return Err(FieldError::new("name", "must not be empty"));
                    }
                    // Envoy: weight >= 1 for TCP splits.
                    if *weight == 0 {
                        return Err(FieldError::new("weight", "must be at least 1"));
                    }
                    Ok(())
                })()
                .at(format_args!("weighted_clusters.clusters[{i}]"))?;
                out.push(WeightedCluster {
                    name: name.clone(),
                    weight: *weight,
                    request_headers: HeaderMods::default(),
                    response_headers: HeaderMods::default(),
                });
            }
            out
        }
        None => {
            return Err(FieldError::new(
                "cluster_specifier",
                "cluster or weighted_clusters is required",
            ))
        }
    };
    Ok(model::TcpProxy {
        stat_prefix: stat_prefix.clone(),
        clusters,
        idle_timeout: opt_duration(idle_timeout, "idle_timeout")?,
        authz: None,
    })
}
