//! Small builders for Envoy protobuf values used across the translator.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    config_source, header_value_option::HeaderAppendAction, AggregatedConfigSource, ApiVersion,
    ConfigSource, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, RegexMatcher, StringMatcher};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value, UInt64Value};
use prost::{Message, Name};

use crate::resources::HeaderModifier;

/// `google.protobuf.Duration` from a std duration (saturating, never panics).
pub(crate) fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Packs a message into an `Any` with its type URL.
pub(crate) fn any<T: Message + Name>(m: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: m.encode_to_vec(),
    }
}

pub(crate) fn u32v(v: u32) -> UInt32Value {
    UInt32Value { value: v }
}

pub(crate) fn u64v(v: u64) -> UInt64Value {
    UInt64Value { value: v }
}

/// `{ads: {}, resource_api_version: V3}`.
pub(crate) fn ads_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub(crate) fn exact(v: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(v.to_string())),
        ..Default::default()
    }
}

pub(crate) fn regex_matcher(v: &str) -> RegexMatcher {
    // Engine left unset: Envoy's default is RE2, and the `google_re2` field is deprecated.
    RegexMatcher {
        regex: v.to_string(),
        engine_type: None,
    }
}

pub(crate) fn regex_string(v: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(regex_matcher(v))),
        ..Default::default()
    }
}

/// Header additions and removals of a Gateway header modifier.
#[derive(Default)]
pub(crate) struct HeaderOps {
    pub(crate) add: Vec<HeaderValueOption>,
    pub(crate) remove: Vec<String>,
}

impl HeaderOps {
    pub(crate) fn extend(&mut self, m: &HeaderModifier) {
        for h in &m.set {
            self.add.push(header_option(
                &h.name,
                &h.value,
                HeaderAppendAction::OverwriteIfExistsOrAdd,
            ));
        }
        for h in &m.add {
            self.add.push(header_option(
                &h.name,
                &h.value,
                HeaderAppendAction::AppendIfExistsOrAdd,
            ));
        }
        for r in &m.remove {
            self.remove.push(r.to_ascii_lowercase());
        }
    }
}

fn header_option(name: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_ascii_lowercase(),
            value: value.to_string(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

/// 64-bit FNV-1a: a stable (across Rust releases and machines) content hash
/// for config versions; not for security.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}
