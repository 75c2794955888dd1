//! Upstream answers kept for their TTL, so a name a session asks again is answered here: one
//! receive and one send, without the forwarding hop (an IDE resolves the same hosts over and over).
//!
//! Only what the policy lets through reaches the cache: a query is judged first, and a hit goes
//! through the same opening and audit as an upstream answer. An entry is found only by the same
//! query (every byte but the id, the name compared without case) from the same uid, so no flag,
//! EDNS option or user's lookups are answered with another's. TTLs count down from the time the
//! answer came; an entry never outlives its shortest TTL, nor `ttl_max_secs`. Negative answers
//! are kept as RFC 2308 says, for their SOA's MINIMUM (see `cacheable`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Entries at most. A full cache drops what has expired and, if still full, its older half: one
/// pass per MAX_ENTRIES / 2 answers, so a stream of names asked once cannot keep the names asked
/// over and over out.
const MAX_ENTRIES: usize = 4096;
/// The OPT pseudo-record's "TTL" is EDNS flags, never counted down.
const TYPE_OPT: u16 = 41;
const TYPE_SOA: u16 = 6;
const RCODE_NXDOMAIN: u8 = 3;

#[derive(Default)]
pub struct Cache {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<(u32, Vec<u8>), Entry>,
    /// Serial of the next entry stored.
    next: u64,
}

struct Entry {
    answer: Vec<u8>,
    /// Where the question section ends in `answer` (it is replaced by the asker's).
    question_end: usize,
    /// Byte offsets of every record's TTL in `answer`, and the TTL stored there.
    ttls: Vec<(usize, u32)>,
    stored: Instant,
    lifetime: Duration,
    serial: u64,
}

/// The lookup key of a query (every byte but the id, the question's name in lower case), and
/// where its question ends.
fn key(uid: u32, query: &[u8]) -> Option<((u32, Vec<u8>), usize)> {
    let end = question_end(query)?;
    let mut k = query.to_vec();
    k[..2].fill(0);
    k[12..end].make_ascii_lowercase();
    Some(((uid, k), end))
}

/// The end of the first (only) question: header, name (uncompressed in a question), type, class.
fn question_end(m: &[u8]) -> Option<usize> {
    if m.len() < 12 || u16::from_be_bytes([m[4], m[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    loop {
        let len = *m.get(i)? as usize;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += 1 + len;
    }
    let end = i + 1 + 4;
    (end <= m.len()).then_some(end)
}

/// Skips a possibly compressed name starting at `i`; returns the offset after it.
fn skip_name(m: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *m.get(i)?;
        if len == 0 {
            return Some(i + 1);
        }
        if len & 0xc0 == 0xc0 {
            m.get(i + 1)?;
            return Some(i + 2);
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += 1 + len as usize;
    }
}

/// What a kept answer needs to be given again.
struct Keepable {
    /// Where the question section ends.
    question_end: usize,
    /// Byte offsets of every record's TTL, and the TTL stored there.
    ttls: Vec<(usize, u32)>,
    /// Seconds the answer may be kept.
    lifetime: u32,
}

/// What it takes to keep an answer. Kept are NOERROR answers with at least one answer record, for
/// their shortest TTL, and (RFC 2308) negative answers, NXDOMAIN or NOERROR without an answer
/// (NODATA: the AAAA of an IPv4-only name, asked by every getaddrinfo), when their authority
/// section has the zone's SOA, for the shorter of its TTL and its MINIMUM field. None for anything
/// else, truncated answers and negative answers without an SOA included.
fn cacheable(m: &[u8]) -> Option<Keepable> {
    let qend = question_end(m)?;
    let (flags, rcode) = (m[2], m[3] & 0x0f);
    let truncated = flags & 0x02 != 0;
    let response = flags & 0x80 != 0;
    let count = |at: usize| usize::from(u16::from_be_bytes([m[at], m[at + 1]]));
    let negative = rcode == RCODE_NXDOMAIN || (rcode == 0 && count(6) == 0);
    if !response || truncated || (rcode != 0 && !negative) {
        return None;
    }
    let (answers, authority) = (count(6), count(8));
    let records = answers + authority + count(10);
    let mut ttls = Vec::with_capacity(records);
    let mut soa_minimum = None;
    let mut i = qend;
    for n in 0..records {
        i = skip_name(m, i)?;
        let fixed = m.get(i..i + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        if rtype != TYPE_OPT {
            ttls.push((i + 4, ttl));
        }
        let rdata = m.get(i + 10..i + 10 + rdlen)?;
        // The SOA's five counters end its data; MINIMUM is the last.
        if rtype == TYPE_SOA && (answers..answers + authority).contains(&n) && rdlen >= 22 {
            let min = &rdata[rdlen - 4..];
            let minimum = u32::from_be_bytes([min[0], min[1], min[2], min[3]]);
            soa_minimum = Some(minimum.min(ttl));
        }
        i += 10 + rdlen;
    }
    let shortest = ttls.iter().map(|(_, t)| *t).min().unwrap_or(0);
    let lifetime = if negative {
        soa_minimum?.min(shortest)
    } else {
        shortest
    };
    Some(Keepable {
        question_end: qend,
        ttls,
        lifetime,
    })
}

impl Cache {
    /// The answer to `query` from `uid` if an unexpired one is kept: the asker's id and question
    /// (its case), every TTL counted down by the time since it came.
    pub fn get(&self, uid: u32, query: &[u8]) -> Option<Vec<u8>> {
        let (k, qend) = key(uid, query)?;
        let mut entries = self.entries.lock().ok()?;
        let e = entries.map.get(&k)?;
        let age = e.stored.elapsed();
        if age >= e.lifetime || e.question_end != qend {
            entries.map.remove(&k);
            return None;
        }
        let mut answer = e.answer.clone();
        answer[..2].copy_from_slice(&query[..2]);
        answer[12..qend].copy_from_slice(&query[12..qend]);
        let age = age.as_secs() as u32;
        for (at, ttl) in &e.ttls {
            answer[*at..*at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
        Some(answer)
    }

    /// Keeps `answer` to `query` from `uid`, for its shortest TTL bounded by `ttl_max` seconds.
    pub fn put(&self, uid: u32, query: &[u8], answer: &[u8], ttl_max: u32) {
        let (
            Some((k, asked_end)),
            Some(Keepable {
                question_end,
                ttls,
                lifetime,
            }),
        ) = (key(uid, query), cacheable(answer))
        else {
            return;
        };
        let shortest = lifetime.min(ttl_max);
        if shortest == 0 || question_end != asked_end {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.map.len() >= MAX_ENTRIES {
            let older_half = entries.next.saturating_sub(MAX_ENTRIES as u64 / 2);
            entries
                .map
                .retain(|_, e| e.stored.elapsed() < e.lifetime && e.serial >= older_half);
        }
        let serial = entries.next;
        entries.next += 1;
        entries.map.insert(
            k,
            Entry {
                answer: answer.to_vec(),
                question_end,
                ttls,
                stored: Instant::now(),
                lifetime: Duration::from_secs(u64::from(shortest)),
                serial,
            },
        );
    }

    /// Drops expired entries (the resolver's sweep).
    pub fn sweep(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.map.retain(|_, e| e.stored.elapsed() < e.lifetime);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.map.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
        rr::{rdata, Name, RData, Record, RecordType},
    };
    use std::str::FromStr;

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn answer(q: &[u8], ttls: &[u32], edns: bool) -> Vec<u8> {
        let q = Message::from_vec(q).unwrap();
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_queries(q.queries.iter().cloned());
        for (i, ttl) in ttls.iter().enumerate() {
            m.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                *ttl,
                RData::A(rdata::A(format!("198.18.0.{}", i + 1).parse().unwrap())),
            ));
        }
        if edns {
            m.edns = Some(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn ttls_of(bytes: &[u8]) -> Vec<u32> {
        Message::from_vec(bytes)
            .unwrap()
            .answers
            .iter()
            .map(|r| r.ttl)
            .collect()
    }

    #[test]
    fn a_hit_has_the_askers_id_and_case_and_counted_down_ttls() {
        let c = Cache::default();
        // hickory writes names in lower case: the asker's case is set by hand (0x20 style).
        let mut q1 = query(7, "git.corp.example.");
        q1[12 + 1..12 + 4].copy_from_slice(b"GiT");
        let a1 = answer(&q1, &[60, 300], true);
        c.put(1000, &q1, &a1, 86_400);
        let mut q2 = query(9, "git.corp.example.");
        q2[12 + 5..12 + 9].copy_from_slice(b"CORP");
        let hit = c.get(1000, &q2).expect("the same question, another case");
        let m = Message::from_vec(&hit).unwrap();
        assert_eq!(m.metadata.id, 9);
        assert_eq!(m.queries[0].name().to_ascii(), "git.CORP.example.");
        assert_eq!(ttls_of(&hit), vec![60, 300]);
        assert!(m.edns.is_some(), "the OPT record is kept as it was");
        // Another user, or another question, is a miss.
        assert!(c.get(1001, &q2).is_none());
        assert!(c.get(1000, &query(9, "other.corp.example.")).is_none());
    }

    #[test]
    fn ttls_count_down_and_the_shortest_one_ends_the_entry() {
        let c = Cache::default();
        let q = query(1, "a.example.");
        c.put(0, &q, &answer(&q, &[2, 60], false), 86_400);
        {
            let mut e = c.entries.lock().unwrap();
            let entry = e.map.values_mut().next().unwrap();
            entry.stored -= Duration::from_millis(1500);
        }
        assert_eq!(ttls_of(&c.get(0, &q).unwrap()), vec![1, 59]);
        {
            let mut e = c.entries.lock().unwrap();
            let entry = e.map.values_mut().next().unwrap();
            entry.stored -= Duration::from_millis(600);
        }
        assert!(c.get(0, &q).is_none(), "past the shortest TTL");
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn what_is_not_kept() {
        let c = Cache::default();
        let q = query(1, "a.example.");
        // No answer record, a zero TTL, an error, a truncated answer, ttl_max 0.
        c.put(0, &q, &answer(&q, &[], false), 60);
        c.put(0, &q, &answer(&q, &[0, 60], false), 60);
        let mut err = answer(&q, &[60], false);
        err[3] |= 3;
        c.put(0, &q, &err, 60);
        let mut tc = answer(&q, &[60], false);
        tc[2] |= 0x02;
        c.put(0, &q, &tc, 60);
        c.put(0, &q, &answer(&q, &[60], false), 0);
        c.put(0, &q, &[0u8; 5], 60);
        assert_eq!(c.len(), 0);
        // ttl_max bounds the entry's life.
        c.put(0, &q, &answer(&q, &[600], false), 30);
        let e = c.entries.lock().unwrap();
        assert_eq!(
            e.map.values().next().unwrap().lifetime,
            Duration::from_secs(30)
        );
    }

    /// A negative answer (`rcode` NXDOMAIN, or NOERROR and no answer) with the zone's SOA in its
    /// authority section, when `soa` is given as (TTL, MINIMUM).
    fn negative(q: &[u8], rcode: ResponseCode, soa: Option<(u32, u32)>) -> Vec<u8> {
        let q = Message::from_vec(q).unwrap();
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_queries(q.queries.iter().cloned());
        if let Some((ttl, minimum)) = soa {
            let zone = Name::from_str("example.").unwrap();
            let data = rdata::SOA::new(
                Name::from_str("ns.example.").unwrap(),
                Name::from_str("hostmaster.example.").unwrap(),
                2026120601,
                3600,
                600,
                86400,
                minimum,
            );
            m.add_authority(Record::from_rdata(zone, ttl, RData::SOA(data)));
        }
        m.to_vec().unwrap()
    }

    fn lifetime(c: &Cache) -> Option<Duration> {
        let e = c.entries.lock().unwrap();
        e.map.values().next().map(|e| e.lifetime)
    }

    #[test]
    fn negative_answers_are_kept_for_the_soa_s_minimum_and_only_with_an_soa() {
        use ResponseCode::{NXDomain, NoError, Refused, ServFail};
        let q = query(1, "a.example.");
        // A fresh cache given one answer: how long it keeps it, if at all.
        let kept = |rcode, soa, ttl_max| {
            let c = Cache::default();
            c.put(0, &q, &negative(&q, rcode, soa), ttl_max);
            (lifetime(&c), c)
        };
        let secs = |n| Some(Duration::from_secs(n));
        // NODATA (the AAAA of an IPv4-only name) and NXDOMAIN: the shorter of the SOA's TTL and
        // MINIMUM, and ttl_max still bounds it.
        assert_eq!(kept(NoError, Some((900, 300)), 86_400).0, secs(300));
        assert_eq!(kept(NXDomain, Some((120, 300)), 86_400).0, secs(120));
        let (life, c) = kept(NXDomain, Some((120, 300)), 30);
        assert_eq!(life, secs(30));
        // The hit counts the SOA's TTL down, and keeps the rcode.
        {
            let mut e = c.entries.lock().unwrap();
            e.map.values_mut().next().unwrap().stored -= Duration::from_secs(10);
        }
        let hit = Message::from_vec(&c.get(0, &query(5, "a.example.")).unwrap()).unwrap();
        assert_eq!(hit.metadata.id, 5);
        assert_eq!(hit.metadata.response_code, NXDomain);
        assert_eq!(hit.authorities[0].ttl, 110);
        // Not kept: no SOA, an SOA with MINIMUM 0, a server failure or refusal even with an SOA.
        for (rcode, soa) in [
            (NXDomain, None),
            (NoError, None),
            (NoError, Some((900, 0))),
            (ServFail, Some((900, 300))),
            (Refused, Some((900, 300))),
        ] {
            assert_eq!(kept(rcode, soa, 86_400).0, None, "{rcode:?} {soa:?}");
        }
    }

    #[test]
    fn a_full_cache_drops_its_older_half_and_keeps_taking_answers() {
        let c = Cache::default();
        let q = |i: usize| query(1, &format!("n{i}.example."));
        for i in 0..MAX_ENTRIES + 1 {
            c.put(0, &q(i), &answer(&q(i), &[300], false), 300);
        }
        assert_eq!(c.len(), MAX_ENTRIES / 2 + 1);
        assert!(c.get(0, &q(0)).is_none(), "the oldest went");
        assert!(c.get(0, &q(MAX_ENTRIES)).is_some(), "the newest was taken");
        assert!(c.get(0, &q(MAX_ENTRIES - 1)).is_some());
    }
}
