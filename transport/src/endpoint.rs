//! Endpoint strings: `tcp://host:port`, `rdma://host:port`, `auto://host:port`.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::error::TransportError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Tcp,
    Rdma,
    /// RDMA when this host has a device and the server offers it, else TCP.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Endpoint, TransportError> {
        let bad = |reason: &str| TransportError::BadEndpoint { endpoint: text.to_string(), reason: reason.to_string() };
        let (scheme, rest) = match text.split_once("://") {
            Some(("tcp", rest)) => (Scheme::Tcp, rest),
            Some(("rdma", rest)) => (Scheme::Rdma, rest),
            Some(("auto", rest)) => (Scheme::Auto, rest),
            Some((other, _)) => return Err(bad(&format!("unknown scheme {other:?}"))),
            None => return Err(bad("missing scheme")),
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port: u16 = port.parse().map_err(|_| bad("port is not a number within 0..=65535"))?;
        Ok(Endpoint { scheme, host: host.to_string(), port })
    }

    /// The first address the host name resolves to.
    pub fn socket_addr(&self) -> Result<SocketAddr, TransportError> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| TransportError::io(format!("resolving {}", self.host), e))?
            .next()
            .ok_or_else(|| TransportError::BadEndpoint {
                endpoint: self.to_string(),
                reason: "host resolves to no address".into(),
            })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            Scheme::Tcp => "tcp",
            Scheme::Rdma => "rdma",
            Scheme::Auto => "auto",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme_and_rejects_bad_ones() {
        let e = Endpoint::parse("tcp://127.0.0.1:7000").unwrap();
        assert_eq!((e.scheme, e.host.as_str(), e.port), (Scheme::Tcp, "127.0.0.1", 7000));
        assert_eq!(Endpoint::parse("rdma://h:1").unwrap().scheme, Scheme::Rdma);
        assert_eq!(Endpoint::parse("auto://[::1]:9").unwrap().host, "::1");
        assert_eq!(Endpoint::parse("auto://[::1]:9").unwrap().to_string(), "auto://[::1]:9");
        for bad in ["127.0.0.1:7000", "udp://h:1", "tcp://h", "tcp://:1", "tcp://h:99999", "tcp://h:x"] {
            assert_eq!(Endpoint::parse(bad).unwrap_err().code(), 2105, "{bad}");
        }
    }
}

/// True when some socket on this host (this network namespace) listens on `addr`'s port at
/// `addr`'s IP or a wildcard address. Reads /proc/net/tcp{,6}; false where they are missing.
pub fn someone_listens_on(addr: std::net::SocketAddr) -> bool {
    const LISTEN_STATE: &str = "0A";
    let tables = ["/proc/net/tcp", "/proc/net/tcp6"];
    tables.iter().filter_map(|path| std::fs::read_to_string(path).ok()).any(|table| {
        table.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(state)) = (fields.nth(1), fields.nth(1)) else { return false };
            state == LISTEN_STATE && proc_address_matches(local, addr)
        })
    })
}

/// Matches a /proc/net/tcp local address (`HEXIP:HEXPORT`, IP in host byte order per 32-bit
/// word) against `addr`, treating an unspecified address on either side as matching any.
fn proc_address_matches(local: &str, addr: std::net::SocketAddr) -> bool {
    let Some((ip_hex, port_hex)) = local.split_once(':') else { return false };
    if u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
        return false;
    }
    let words: Option<Vec<u32>> = (0..ip_hex.len() / 8)
        .map(|i| ip_hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()))
        .collect();
    let Some(words) = words else { return false };
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let listening: std::net::IpAddr = match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes);
            let v6 = std::net::Ipv6Addr::from(octets);
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return false,
    };
    listening.is_unspecified() || addr.ip().is_unspecified() || listening == addr.ip()
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    #[test]
    fn finds_a_listener_and_not_a_free_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(someone_listens_on(addr));
        drop(listener);
        assert!(!someone_listens_on(addr));
    }

    #[test]
    fn proc_addresses() {
        let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(proc_address_matches("0100007F:1F90", addr));
        assert!(proc_address_matches("00000000:1F90", addr));
        assert!(!proc_address_matches("0100007F:1F91", addr));
        assert!(!proc_address_matches("garbage", addr));
    }
}
