//! The DNS wire format, through hickory-proto: what the resolver reads of a query and an answer,
//! and the answers it makes itself.

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{rdata, Name, RData, Record, RecordType},
};

/// The one question of a standard query.
pub struct Question {
    pub message: Message,
    /// Lower case, no trailing dot: what patterns are matched against.
    pub name: String,
    /// As asked (case kept: data hidden in a name may be case-sensitive), for the audit log.
    pub asked: String,
    pub qtype: RecordType,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Not even a header: nothing to answer.
    Unanswerable,
    /// The header's id, to answer FORMERR (or NOTIMP for other opcodes) to.
    Answer(u16, ResponseCode, String),
}

pub fn parse_query(bytes: &[u8]) -> Result<Question, Malformed> {
    let id = match bytes {
        [a, b, ..] if bytes.len() >= 12 => u16::from_be_bytes([*a, *b]),
        _ => return Err(Malformed::Unanswerable),
    };
    let message = Message::from_vec(bytes)
        .map_err(|e| Malformed::Answer(id, ResponseCode::FormErr, format!("undecodable: {e}")))?;
    if message.metadata.message_type != MessageType::Query {
        return Err(Malformed::Answer(
            id,
            ResponseCode::FormErr,
            "a response sent as a query".into(),
        ));
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(Malformed::Answer(
            id,
            ResponseCode::NotImp,
            format!("opcode {:?} is not served", message.metadata.op_code),
        ));
    }
    let [q] = message.queries.as_slice() else {
        return Err(Malformed::Answer(
            id,
            ResponseCode::FormErr,
            format!(
                "{} questions (exactly one is served)",
                message.queries.len()
            ),
        ));
    };
    let asked = q.name().to_ascii().trim_end_matches('.').to_string();
    let name = egressd_common::dns_policy::normalize(&asked);
    let qtype = q.query_type();
    Ok(Question {
        name,
        asked,
        qtype,
        message,
    })
}

fn response_to(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.iter().cloned());
    m
}

pub fn error_answer(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::error_msg(id, OpCode::Query, code);
    m.metadata.recursion_available = true;
    m.to_vec().unwrap_or_default()
}

/// An answer without records: NXDOMAIN, REFUSED, SERVFAIL.
pub fn refusal(q: &Question, code: ResponseCode) -> Vec<u8> {
    response_to(&q.message, code).to_vec().unwrap_or_default()
}

/// An answer made here, from local addresses (localhost, /etc/hosts), of the question's type.
pub fn local_answer(q: &Question, addrs: &[IpAddr]) -> Vec<u8> {
    let mut m = response_to(&q.message, ResponseCode::NoError);
    m.metadata.authoritative = true;
    let name = q.message.queries[0].name().clone();
    for a in addrs {
        let data = match (a, q.qtype) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*v6)),
            _ => continue,
        };
        m.add_answer(Record::from_rdata(name.clone(), 0, data));
    }
    m.to_vec().unwrap_or_default()
}

/// The id of a raw message (the first two bytes).
pub fn id_of(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
}

pub fn set_id(bytes: &mut [u8], id: u16) {
    if bytes.len() >= 2 {
        bytes[..2].copy_from_slice(&id.to_be_bytes());
    }
}

/// What an upstream answer says about the name asked.
pub struct Answer {
    pub rcode: ResponseCode,
    /// The A and AAAA addresses of `name` or of a name it is a CNAME (chain) of, with their TTLs.
    pub addrs: Vec<(IpAddr, u32)>,
}

pub fn read_answer(bytes: &[u8], name: &str) -> Option<Answer> {
    let m = Message::from_vec(bytes).ok()?;
    let norm = |n: &Name| egressd_common::dns_policy::normalize(&n.to_ascii());
    // Owner names that stand for the question: itself and its CNAME targets, followed in answer
    // order and bounded, as a stub resolver would.
    let mut names = vec![name.to_string()];
    for _ in 0..8 {
        let before = names.len();
        for r in &m.answers {
            if let RData::CNAME(target) = &r.data {
                let (owner, target) = (norm(&r.name), norm(&target.0));
                if names.contains(&owner) && !names.contains(&target) {
                    names.push(target);
                }
            }
        }
        if names.len() == before {
            break;
        }
    }
    let addrs = m
        .answers
        .iter()
        .filter(|r| names.contains(&norm(&r.name)))
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect();
    Some(Answer {
        rcode: m.metadata.response_code,
        addrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn a_query_is_read_and_refused_with_its_question() {
        let q = parse_query(&query("Git.Corp.Example.", RecordType::A)).unwrap();
        assert_eq!(q.name, "git.corp.example");
        let r = Message::from_vec(&refusal(&q, ResponseCode::NXDomain)).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.queries.len(), 1);
    }

    #[test]
    fn garbage_is_formerr_or_unanswerable() {
        assert_eq!(parse_query(&[1, 2, 3]).err(), Some(Malformed::Unanswerable));
        let mut junk = vec![0xab, 0xcd];
        junk.extend_from_slice(&[0xff; 30]);
        match parse_query(&junk) {
            Err(Malformed::Answer(0xabcd, ResponseCode::FormErr, _)) => {}
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn addresses_follow_cnames_and_ignore_other_owners() {
        let q = Name::from_str("www.corp.example.").unwrap();
        let cdn = Name::from_str("edge.cdn.example.").unwrap();
        let other = Name::from_str("evil.example.").unwrap();
        let mut m = Message::response(1, OpCode::Query);
        m.add_answer(Record::from_rdata(
            q.clone(),
            30,
            RData::CNAME(rdata::CNAME(cdn.clone())),
        ));
        m.add_answer(Record::from_rdata(
            cdn,
            60,
            RData::A(rdata::A("198.18.9.9".parse().unwrap())),
        ));
        m.add_answer(Record::from_rdata(
            other,
            60,
            RData::A(rdata::A("198.18.6.6".parse().unwrap())),
        ));
        let a = read_answer(&m.to_vec().unwrap(), "www.corp.example").unwrap();
        assert_eq!(a.addrs, vec![("198.18.9.9".parse().unwrap(), 60)]);
    }
}
