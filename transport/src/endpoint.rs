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
