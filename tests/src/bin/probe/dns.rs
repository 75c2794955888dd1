//! DNS for the tests: `dns-server` is the upstream on an outside host (it logs every query it
//! gets, so a test can prove a name never reached it); `dns-query` and `resolve` ask from inside a
//! sandbox.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _, UdpSocket},
    str::FromStr as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{rdata, Name, RData, Record, RecordType},
};

/// `dns-server V4 V6 LOG NAME=IP/TTL... [soa=ZONE/SECS]`: answers UDP and TCP on port 53 of both
/// addresses; appends `proto qname qtype` to LOG for every query; writes LOG.ready once listening.
/// With `soa=`, negative answers (NXDOMAIN, or no record of the type asked) for names in ZONE carry
/// the zone's SOA with TTL and MINIMUM SECS, as an authoritative or recursive server sends them.
pub fn server(v4: &str, v6: &str, log: &str, records: &[&str]) -> ! {
    let soa = records.iter().find_map(|r| {
        let (zone, secs) = r.strip_prefix("soa=")?.split_once('/')?;
        Some((zone.to_string(), secs.parse::<u32>().unwrap()))
    });
    let table: Vec<(String, IpAddr, u32)> = records
        .iter()
        .filter(|r| !r.starts_with("soa="))
        .map(|r| {
            let (name, rest) = r.split_once('=').expect("NAME=IP/TTL");
            let (ip, ttl) = rest.split_once('/').expect("NAME=IP/TTL");
            (name.to_string(), ip.parse().unwrap(), ttl.parse().unwrap())
        })
        .collect();
    let table = Arc::new((table, soa));
    let log = Arc::new(Mutex::new(
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap(),
    ));
    let mut threads = Vec::new();
    for ip in [v4, v6] {
        let addr = SocketAddr::new(ip.parse().unwrap(), 53);
        let udp = UdpSocket::bind(addr).unwrap();
        let tcp = TcpListener::bind(addr).unwrap();
        let (t, l) = (table.clone(), log.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(a) = answer(&buf[..n], &t, &l, "udp") {
                    let _ = udp.send_to(&a, peer);
                }
            }
        }));
        let (t, l) = (table.clone(), log.clone());
        threads.push(std::thread::spawn(move || {
            for mut s in tcp.incoming().flatten() {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                if s.read_exact(&mut q).is_err() {
                    continue;
                }
                if let Some(a) = answer(&q, &t, &l, "tcp") {
                    let _ = s.write_all(&(a.len() as u16).to_be_bytes());
                    let _ = s.write_all(&a);
                }
            }
        }));
    }
    fs::write(format!("{}.ready", log_path_hint(&log)), b"").ok();
    for t in threads {
        let _ = t.join();
    }
    std::process::exit(0)
}

fn log_path_hint(log: &Arc<Mutex<fs::File>>) -> String {
    // The log's own path, read back from /proc, so the ready marker sits beside it.
    let fd = {
        use std::os::fd::AsRawFd as _;
        log.lock().unwrap().as_raw_fd()
    };
    fs::read_link(format!("/proc/self/fd/{fd}"))
        .unwrap()
        .display()
        .to_string()
}

type Table = (Vec<(String, IpAddr, u32)>, Option<(String, u32)>);

fn answer(q: &[u8], table: &Table, log: &Mutex<fs::File>, proto: &str) -> Option<Vec<u8>> {
    let (table, soa) = table;
    let m = Message::from_vec(q).ok()?;
    let query = m.queries.first()?.clone();
    let name = query.name().to_ascii().trim_end_matches('.').to_lowercase();
    let qtype = query.query_type();
    writeln!(log.lock().unwrap(), "{proto} {name} {qtype}").ok();
    let mut r = Message::response(m.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = m.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_query(query.clone());
    let mut known = false;
    for (n, ip, ttl) in table {
        if *n != name {
            continue;
        }
        known = true;
        let data = match (ip, qtype) {
            (IpAddr::V4(a), RecordType::A) => RData::A(rdata::A(*a)),
            (IpAddr::V6(a), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*a)),
            _ => continue,
        };
        r.add_answer(Record::from_rdata(query.name().clone(), *ttl, data));
    }
    if !known {
        r.metadata.response_code = ResponseCode::NXDomain;
    }
    if let Some((zone, secs)) = soa {
        if r.answers.is_empty() && (name == *zone || name.ends_with(&format!(".{zone}"))) {
            let data = rdata::SOA::new(
                Name::from_str(&format!("ns.{zone}.")).unwrap(),
                Name::from_str(&format!("hostmaster.{zone}.")).unwrap(),
                1,
                3600,
                600,
                86400,
                *secs,
            );
            let owner = Name::from_str(&format!("{zone}.")).unwrap();
            r.add_authority(Record::from_rdata(owner, *secs, RData::SOA(data)));
        }
    }
    r.to_vec().ok()
}

/// `dns-query udp|udp-connected|tcp SERVER:PORT NAME [A|AAAA]`: prints
/// `rcode=X answers=a,b from=SERVER` (from: where the UDP answer said it came from). Exit 0 when
/// an answer came, 4 otherwise.
pub fn query(mode: &str, server: &str, name: &str, qtype: &str) -> i32 {
    let server: SocketAddr = server.parse().expect("SERVER:PORT");
    let mut m = Message::new(0x5eed, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_str(name).expect("a DNS name"),
        RecordType::from_str(qtype).expect("A or AAAA"),
    ));
    let q = m.to_vec().unwrap();
    match ask(mode, server, &q) {
        Ok((bytes, from)) => {
            print_answer(&bytes, from);
            0
        }
        Err(e) => {
            println!("error: {e}");
            4
        }
    }
}

/// `dns-raw SERVER:PORT HEX`: sends raw bytes over UDP, prints the answer's rcode and id.
pub fn raw(server: &str, hex: &str) -> i32 {
    let server: SocketAddr = server.parse().expect("SERVER:PORT");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    match ask("udp", server, &bytes) {
        Ok((a, from)) => {
            let id = u16::from_be_bytes([a[0], a[1]]);
            let rcode = ResponseCode::from_low(a[3] & 0x0f);
            println!("rcode={rcode:?} id={id:04x} from={}", from.unwrap());
            0
        }
        Err(e) => {
            println!("error: {e}");
            4
        }
    }
}

fn ask(mode: &str, server: SocketAddr, q: &[u8]) -> std::io::Result<(Vec<u8>, Option<SocketAddr>)> {
    let wait = Some(Duration::from_secs(3));
    let bind = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let mut buf = vec![0u8; 4096];
    match mode {
        "udp" => {
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(wait)?;
            s.send_to(q, server)?;
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((buf[..n].to_vec(), Some(from)))
        }
        "udp-connected" => {
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(wait)?;
            s.connect(server)?;
            s.send(q)?;
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((buf[..n].to_vec(), Some(from)))
        }
        "tcp" => {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
            s.set_read_timeout(wait)?;
            s.write_all(&(q.len() as u16).to_be_bytes())?;
            s.write_all(q)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut a)?;
            Ok((a, None))
        }
        other => panic!("unknown dns-query mode {other}"),
    }
}

fn print_answer(bytes: &[u8], from: Option<SocketAddr>) {
    let Ok(m) = Message::from_vec(bytes) else {
        println!("rcode=undecodable");
        return;
    };
    let answers: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    let from = from.map(|f| f.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "rcode={:?} answers={} from={from}",
        m.metadata.response_code,
        answers.join(",")
    );
}

/// `resolve NAME`: getaddrinfo(3), as every program does it. Exit 0 and the addresses, or 3.
pub fn resolve(name: &str) -> i32 {
    match (name, 0).to_socket_addrs() {
        Ok(addrs) => {
            let list: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            println!("resolved {}", list.join(","));
            0
        }
        Err(e) => {
            println!("unresolved: {e}");
            3
        }
    }
}
