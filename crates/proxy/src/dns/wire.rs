//! DNS messages (RFC 1035): just enough to answer A/AAAA questions for mesh
//! names and to recognize the upstream's reply to a forwarded query.
//!
//! Contract: parsing takes untrusted bytes and never panics, never recurses
//! and never loops unboundedly: a name is at most [`MAX_NAME_LEN`] bytes in
//! wire form, follows at most [`MAX_POINTERS`] compression pointers, and
//! every pointer must point strictly backwards. Anything outside that is an
//! error, answered with FORMERR when the header could be read.
//!
//! Non-goals: a general DNS library. Records other than the question and
//! EDNS's OPT are skipped, not decoded; messages are never re-encoded when
//! forwarded (the upstream's bytes reach the client untouched).

use std::net::Ipv4Addr;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 12;
/// Longest name in wire form (RFC 1035 2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// Compression pointers followed in one name before it is refused. Real
/// messages use one or two; the bound keeps hostile ones cheap.
pub const MAX_POINTERS: usize = 16;
/// The classic UDP payload limit without EDNS.
pub const CLASSIC_UDP_SIZE: usize = 512;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NOTIMP: u8 = 4;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;

/// Why a message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message ends early")]
    Truncated,
    #[error("name longer than 255 bytes")]
    NameTooLong,
    #[error("compression pointer loops, points forward or is nested too deep")]
    BadPointer,
    #[error("unsupported label type")]
    BadLabel,
    #[error("{0}")]
    Unsupported(&'static str),
}

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    /// The header of `msg`, if it has one.
    pub fn parse(msg: &[u8]) -> Option<Header> {
        let h = msg.get(..HEADER_LEN)?;
        let w = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        Some(Header {
            id: w(0),
            flags: w(2),
            qdcount: w(4),
            ancount: w(6),
            nscount: w(8),
            arcount: w(10),
        })
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }

    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }

    pub fn truncated(&self) -> bool {
        self.flags & FLAG_TC != 0
    }

    pub fn recursion_desired(&self) -> bool {
        self.flags & FLAG_RD != 0
    }

    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// A domain name as it was sent: labels keep their case (resolvers that
/// randomize it, "0x20", check that the answer echoes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    /// Uncompressed wire form: length-prefixed labels, then a zero byte.
    wire: Vec<u8>,
}

impl Name {
    /// `example.com` (or `example.com.`) in wire form; `None` for an empty
    /// label or one over 63 bytes, or a name over 255 bytes.
    pub fn from_dotted(s: &str) -> Option<Name> {
        let s = s.strip_suffix('.').unwrap_or(s);
        let mut wire = Vec::with_capacity(s.len() + 2);
        if !s.is_empty() {
            for label in s.split('.') {
                if label.is_empty() || label.len() > 63 {
                    return None;
                }
                wire.push(label.len() as u8);
                wire.extend_from_slice(label.as_bytes());
            }
        }
        wire.push(0);
        (wire.len() <= MAX_NAME_LEN).then_some(Name { wire })
    }

    /// Wire form (uncompressed).
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The labels, as sent.
    pub fn labels(&self) -> impl Iterator<Item = &[u8]> {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let len = usize::from(*self.wire.get(pos)?);
            if len == 0 {
                return None;
            }
            let label = self.wire.get(pos + 1..pos + 1 + len)?;
            pos += 1 + len;
            Some(label)
        })
    }

    /// Lower-case dotted form without the final dot (`""` for the root);
    /// bytes outside printable ASCII (and dots inside labels) are escaped
    /// as `\DDD`, so two different names never look the same.
    pub fn to_lower_dotted(&self) -> String {
        let mut out = String::with_capacity(self.wire.len());
        for (i, label) in self.labels().enumerate() {
            if i > 0 {
                out.push('.');
            }
            for &b in label {
                if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                    out.push(char::from(b.to_ascii_lowercase()));
                } else {
                    out.push_str(&format!("\\{b:03}"));
                }
            }
        }
        out
    }

    /// Same name, ignoring ASCII case (RFC 4343).
    pub fn eq_ignore_case(&self, other: &Name) -> bool {
        self.wire.eq_ignore_ascii_case(&other.wire)
    }
}

/// The one question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: Name,
    pub qtype: u16,
    pub qclass: u16,
}

/// A parsed query: its header, its question and what the client can take
/// over UDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub header: Header,
    pub question: Question,
    /// The largest UDP reply the client accepts: its EDNS payload size
    /// (at least 512), else 512.
    pub udp_size: usize,
}

/// Reads the name at `start` in `msg`. Returns it and the offset just past
/// it at `start` (after the first pointer, if any).
pub fn read_name(msg: &[u8], start: usize) -> Result<(Name, usize), WireError> {
    let mut wire = Vec::with_capacity(32);
    let mut pos = start;
    let mut after: Option<usize> = None;
    let mut pointers = 0;
    loop {
        let len = usize::from(*msg.get(pos).ok_or(WireError::Truncated)?);
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    wire.push(0);
                    return Ok((Name { wire }, after.unwrap_or(pos + 1)));
                }
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(WireError::Truncated)?;
                // +1 for the final zero byte still to come.
                if wire.len() + 1 + len + 1 > MAX_NAME_LEN {
                    return Err(WireError::NameTooLong);
                }
                wire.push(len as u8);
                wire.extend_from_slice(label);
                pos += 1 + len;
            }
            0xc0 => {
                let lo = usize::from(*msg.get(pos + 1).ok_or(WireError::Truncated)?);
                let target = ((len & 0x3f) << 8) | lo;
                after.get_or_insert(pos + 2);
                pointers += 1;
                // Strictly backwards: no loops, whatever the count.
                if pointers > MAX_POINTERS || target >= pos {
                    return Err(WireError::BadPointer);
                }
                pos = target;
            }
            _ => return Err(WireError::BadLabel),
        }
    }
}

/// Skips the resource record at `pos`; returns its type, class, where its
/// data starts and the offset after it.
fn skip_record(msg: &[u8], pos: usize) -> Result<(u16, u16, usize, usize), WireError> {
    let (_, pos) = read_name(msg, pos)?;
    let fixed = msg.get(pos..pos + 10).ok_or(WireError::Truncated)?;
    let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let class = u16::from_be_bytes([fixed[2], fixed[3]]);
    let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
    let end = pos + 10 + rdlen;
    if end > msg.len() {
        return Err(WireError::Truncated);
    }
    Ok((rtype, class, pos + 10, end))
}

/// Parses a query: exactly one question; the EDNS payload size from an OPT
/// record in the additional section, if any.
pub fn parse_query(msg: &[u8]) -> Result<Query, WireError> {
    let header = Header::parse(msg).ok_or(WireError::Truncated)?;
    if header.is_response() {
        return Err(WireError::Unsupported("a response, not a query"));
    }
    if header.qdcount != 1 {
        return Err(WireError::Unsupported("a query has exactly one question"));
    }
    let (name, pos) = read_name(msg, HEADER_LEN)?;
    let q = msg.get(pos..pos + 4).ok_or(WireError::Truncated)?;
    let question = Question {
        name,
        qtype: u16::from_be_bytes([q[0], q[1]]),
        qclass: u16::from_be_bytes([q[2], q[3]]),
    };
    let mut pos = pos + 4;
    let mut udp_size = CLASSIC_UDP_SIZE;
    let records = u32::from(header.ancount) + u32::from(header.nscount) + u32::from(header.arcount);
    // Each record takes at least 11 bytes, so this loop ends with the
    // message even when the counts lie.
    for i in 0..records {
        let (rtype, class, _, next) = skip_record(msg, pos)?;
        let additional = i >= u32::from(header.ancount) + u32::from(header.nscount);
        if additional && rtype == TYPE_OPT {
            udp_size = usize::from(class).max(CLASSIC_UDP_SIZE);
        }
        pos = next;
    }
    Ok(Query {
        header,
        question,
        udp_size,
    })
}

/// The question of a reply (its first), if it has one and it parses.
pub fn reply_question(msg: &[u8]) -> Option<Question> {
    let header = Header::parse(msg)?;
    if header.qdcount == 0 {
        return None;
    }
    let (name, pos) = read_name(msg, HEADER_LEN).ok()?;
    let q = msg.get(pos..pos + 4)?;
    Some(Question {
        name,
        qtype: u16::from_be_bytes([q[0], q[1]]),
        qclass: u16::from_be_bytes([q[2], q[3]]),
    })
}

/// True when `reply` answers `query`: same id, a response, and (when it
/// carries one) the same question, ignoring case. Anything else is a stray
/// or spoofed datagram and is dropped.
pub fn is_reply_to(query: &Query, reply: &[u8]) -> bool {
    let Some(h) = Header::parse(reply) else {
        return false;
    };
    if h.id != query.header.id || !h.is_response() {
        return false;
    }
    if h.qdcount == 0 {
        // Errors like FORMERR may come without the question.
        return h.rcode() != RCODE_NOERROR;
    }
    reply_question(reply).is_some_and(|q| {
        q.qtype == query.question.qtype
            && q.qclass == query.question.qclass
            && q.name.eq_ignore_case(&query.question.name)
    })
}

/// A reply to `query` with `rcode` and one A record per address in
/// `answers` (TTL `ttl`). `authoritative` sets AA (mesh names are ours).
pub fn reply(
    query: &Query,
    rcode: u8,
    answers: &[Ipv4Addr],
    ttl: u32,
    authoritative: bool,
) -> Vec<u8> {
    let q = &query.question;
    let mut out = Vec::with_capacity(HEADER_LEN + q.name.wire.len() + 4 + answers.len() * 16);
    let mut flags =
        FLAG_QR | FLAG_RA | (query.header.flags & (0x7800 | FLAG_RD)) | u16::from(rcode & 0xf);
    if authoritative {
        flags |= FLAG_AA;
    }
    let ancount = u16::try_from(answers.len()).unwrap_or(u16::MAX);
    for w in [query.header.id, flags, 1, ancount, 0, 0] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(&q.name.wire);
    out.extend_from_slice(&q.qtype.to_be_bytes());
    out.extend_from_slice(&q.qclass.to_be_bytes());
    for ip in answers.iter().take(usize::from(ancount)) {
        // The question's name, by pointer (it starts right after the header).
        out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// A reply with `rcode` and no question, for a message whose question could
/// not be read. `None` when not even the header could, or when `msg` is
/// itself a response (answering those would let two servers ping-pong).
pub fn error_reply(msg: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let h = Header::parse(msg)?;
    if h.is_response() {
        return None;
    }
    let flags = FLAG_QR | FLAG_RA | (h.flags & (0x7800 | FLAG_RD)) | u16::from(rcode & 0xf);
    let mut out = Vec::with_capacity(HEADER_LEN);
    for w in [h.id, flags, 0, 0, 0, 0] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    Some(out)
}

/// A query for `name` (tests and health checks).
pub fn query(id: u16, name: &Name, qtype: u16, recursion_desired: bool) -> Vec<u8> {
    let flags = if recursion_desired { FLAG_RD } else { 0 };
    let mut out = Vec::with_capacity(HEADER_LEN + name.wire.len() + 4);
    for w in [id, flags, 1, 0, 0, 0] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(&name.wire);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// The A records of the answer section of `msg` (tests, and anyone who
/// wants to read a reply): `None` when it does not parse.
pub fn answer_addresses(msg: &[u8]) -> Option<Vec<Ipv4Addr>> {
    let h = Header::parse(msg)?;
    let mut pos = HEADER_LEN;
    for _ in 0..h.qdcount {
        let (_, p) = read_name(msg, pos).ok()?;
        pos = p + 4;
    }
    let mut out = Vec::new();
    for _ in 0..h.ancount {
        let (rtype, class, data, next) = skip_record(msg, pos).ok()?;
        if let (TYPE_A, CLASS_IN, Some(&[a, b, c, d])) = (rtype, class, msg.get(data..next)) {
            out.push(Ipv4Addr::new(a, b, c, d));
        }
        pos = next;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
