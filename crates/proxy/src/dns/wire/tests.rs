//! Codec tests: round trips, compression, hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn name(s: &str) -> Name {
    Name::from_dotted(s).unwrap()
}

#[test]
fn query_round_trip_keeps_case_and_reads_edns_size() {
    let mut q = query(0xbeef, &name("CaTaLog.Default"), TYPE_A, true);
    let parsed = parse_query(&q).unwrap();
    assert_eq!(parsed.header.id, 0xbeef);
    assert!(parsed.header.recursion_desired());
    assert_eq!(parsed.question.qtype, TYPE_A);
    assert_eq!(parsed.question.qclass, CLASS_IN);
    assert_eq!(parsed.question.name.to_lower_dotted(), "catalog.default");
    assert_eq!(parsed.udp_size, 512);
    // An OPT record (root name, type 41, class = payload size 1232).
    q[11] = 1; // arcount = 1
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(parse_query(&q).unwrap().udp_size, 1232);

    let r = reply(
        &parsed,
        RCODE_NOERROR,
        &[Ipv4Addr::new(240, 240, 1, 2)],
        30,
        true,
    );
    let h = Header::parse(&r).unwrap();
    assert!(h.is_response());
    assert_eq!(h.id, 0xbeef);
    assert_eq!(h.rcode(), RCODE_NOERROR);
    assert!(h.recursion_desired());
    assert!(is_reply_to(&parsed, &r));
    // The question is echoed with the client's case.
    let echoed = reply_question(&r).unwrap();
    assert_eq!(echoed.name.wire(), parsed.question.name.wire());
    assert_eq!(
        answer_addresses(&r).unwrap(),
        vec![Ipv4Addr::new(240, 240, 1, 2)]
    );
}

#[test]
fn is_reply_to_rejects_strays() {
    let q = parse_query(&query(7, &name("example.com"), TYPE_A, true)).unwrap();
    let good = reply(&q, RCODE_NOERROR, &[], 0, false);
    assert!(is_reply_to(&q, &good));
    let mut other_id = good.clone();
    other_id[1] = 8;
    assert!(!is_reply_to(&q, &other_id));
    let other_q = parse_query(&query(7, &name("example.org"), TYPE_A, true)).unwrap();
    assert!(!is_reply_to(
        &q,
        &reply(&other_q, RCODE_NOERROR, &[], 0, false)
    ));
    // The query itself (QR clear) is not a reply.
    assert!(!is_reply_to(
        &q,
        &query(7, &name("example.com"), TYPE_A, true)
    ));
    assert!(!is_reply_to(&q, &[]));
}

#[test]
fn compression_pointers_are_followed_backwards_only() {
    // Header, then "a.b" at 12, then a name at 17: "x" + pointer to 12.
    let mut msg = vec![0u8; HEADER_LEN];
    msg.extend_from_slice(&[1, b'a', 1, b'b', 0]);
    msg.extend_from_slice(&[1, b'x', 0xc0, 12]);
    let (n, after) = read_name(&msg, 17).unwrap();
    assert_eq!(n.to_lower_dotted(), "x.a.b");
    assert_eq!(after, msg.len());
    // A pointer to itself.
    let mut looped = vec![0u8; HEADER_LEN];
    looped.extend_from_slice(&[0xc0, 12]);
    assert_eq!(read_name(&looped, 12), Err(WireError::BadPointer));
    // A forward pointer.
    let mut fwd = vec![0u8; HEADER_LEN];
    fwd.extend_from_slice(&[0xc0, 14, 0]);
    assert_eq!(read_name(&fwd, 12), Err(WireError::BadPointer));
    // Two pointers chasing each other: 12 -> 14 is forward, so refused;
    // 14 -> 12 -> 14 would loop.
    let mut pair = vec![0u8; HEADER_LEN];
    pair.extend_from_slice(&[0xc0, 14, 0xc0, 12]);
    assert_eq!(read_name(&pair, 14), Err(WireError::BadPointer));
    // A chain of MAX_POINTERS + 1 backward pointers.
    let mut chain = vec![0u8; HEADER_LEN];
    chain.push(0);
    for i in 0..=MAX_POINTERS {
        let target = (HEADER_LEN + if i == 0 { 0 } else { 1 + 2 * (i - 1) }) as u8;
        chain.extend_from_slice(&[0xc0, target]);
    }
    let last = chain.len() - 2;
    assert_eq!(read_name(&chain, last), Err(WireError::BadPointer));
    // One fewer is fine.
    assert!(read_name(&chain, last - 2).is_ok());
}

#[test]
fn names_are_bounded() {
    let long = vec!["a".repeat(63); 4].join(".");
    assert!(Name::from_dotted(&long).is_none()); // 4 * 64 + 1 > 255
    assert!(Name::from_dotted(&"a".repeat(64)).is_none());
    assert!(Name::from_dotted("a..b").is_none());
    assert_eq!(Name::from_dotted("").unwrap().wire(), &[0]);
    // On the wire: labels adding up to more than 255 bytes.
    let mut msg = vec![0u8; HEADER_LEN];
    for _ in 0..5 {
        msg.push(63);
        msg.extend_from_slice(&[b'a'; 63]);
    }
    msg.push(0);
    assert_eq!(read_name(&msg, HEADER_LEN), Err(WireError::NameTooLong));
    // Reserved label types.
    let mut ext = vec![0u8; HEADER_LEN];
    ext.extend_from_slice(&[0x40, 0]);
    assert_eq!(read_name(&ext, HEADER_LEN), Err(WireError::BadLabel));
    // Odd bytes are escaped, so they cannot pose as a dot.
    let mut odd = vec![0u8; HEADER_LEN];
    odd.extend_from_slice(&[3, b'a', b'.', b'B', 0]);
    assert_eq!(
        read_name(&odd, HEADER_LEN).unwrap().0.to_lower_dotted(),
        "a\\046b"
    );
}

#[test]
fn malformed_queries_are_refused_not_panicked_on() {
    assert_eq!(parse_query(&[]), Err(WireError::Truncated));
    assert_eq!(error_reply(&[1, 2, 3], RCODE_FORMERR), None);
    let mut two = query(1, &name("a"), TYPE_A, true);
    two[5] = 2;
    assert!(parse_query(&two).is_err());
    let e = error_reply(&two, RCODE_FORMERR).unwrap();
    let h = Header::parse(&e).unwrap();
    assert_eq!((h.id, h.rcode(), h.qdcount), (1, RCODE_FORMERR, 0));
    // A response is never answered.
    let q = parse_query(&query(1, &name("a"), TYPE_A, true)).unwrap();
    assert_eq!(
        error_reply(&reply(&q, 0, &[], 0, false), RCODE_FORMERR),
        None
    );
    // Counts that promise records that are not there.
    let mut lying = query(1, &name("a"), TYPE_A, true);
    lying[6] = 0xff;
    lying[7] = 0xff;
    assert_eq!(parse_query(&lying), Err(WireError::Truncated));
}

/// Property test: any bytes, and any mutation of a valid query, parse or
/// fail without panicking, in bounded time, and whatever parses re-encodes
/// into a reply that parses back to the same question.
#[test]
fn random_and_mutated_input_never_panics() {
    let mut rng = fastrand::Rng::with_seed(0x6d65_7368);
    let seeds: Vec<Vec<u8>> = vec![
        query(1, &name("catalog.default.svc.cluster.local"), TYPE_A, true),
        {
            let mut q = query(2, &name("x.y"), TYPE_AAAA, true);
            q[11] = 1;
            q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
            q
        },
        {
            // A reply: answers whose names are compression pointers.
            let q = parse_query(&query(3, &name("a.b.c"), TYPE_A, false)).unwrap();
            reply(&q, 0, &[Ipv4Addr::new(1, 2, 3, 4); 3], 5, true)
        },
    ];
    let check = |msg: &[u8]| {
        let _ = Header::parse(msg);
        let _ = reply_question(msg);
        let _ = answer_addresses(msg);
        let _ = error_reply(msg, RCODE_FORMERR);
        for start in [0, HEADER_LEN, msg.len() / 2] {
            let _ = read_name(msg, start);
        }
        if let Ok(q) = parse_query(msg) {
            assert!(q.question.name.wire().len() <= MAX_NAME_LEN);
            let r = reply(&q, RCODE_NOERROR, &[Ipv4Addr::LOCALHOST], 1, true);
            assert!(is_reply_to(&q, &r));
            assert_eq!(answer_addresses(&r).unwrap(), vec![Ipv4Addr::LOCALHOST]);
        }
    };
    for _ in 0..100_000 {
        let len = rng.usize(0..300);
        let msg: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        check(&msg);
    }
    for _ in 0..100_000 {
        let mut msg = seeds[rng.usize(..seeds.len())].clone();
        for _ in 0..rng.usize(1..6) {
            match rng.u8(0..4) {
                0 if !msg.is_empty() => {
                    let i = rng.usize(..msg.len());
                    msg[i] = rng.u8(..);
                }
                1 if !msg.is_empty() => {
                    msg.truncate(rng.usize(..msg.len()));
                }
                2 => {
                    let i = rng.usize(..=msg.len());
                    msg.insert(i, if rng.bool() { 0xc0 } else { rng.u8(..) });
                }
                _ => {
                    // A pointer anywhere, to anywhere.
                    if msg.len() >= 2 {
                        let i = rng.usize(..msg.len() - 1);
                        msg[i] = 0xc0 | rng.u8(0..4);
                        msg[i + 1] = rng.u8(..);
                    }
                }
            }
        }
        check(&msg);
    }
}
