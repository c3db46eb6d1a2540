//! TLS on the proxy's client ports (rustls, ring): the certificate chain and private key come
//! from PEM files named in the config. The gRPC port offers ALPN `h2` only, the HTTP port
//! `http/1.1`. The handshake runs before any request is read, bounded by the same
//! `handshake_timeout_ms` as the HTTP/2 preface check.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::error::ProxyError;

/// Certificates one chain file may hold (leaf and intermediates); more is a mistake.
const CHAIN_CERTIFICATES_MAX: usize = 16;
/// Largest PEM file read; a certificate chain or key is a few KiB.
const PEM_FILE_MAX_BYTES: u64 = 1 << 20;

/// Where the proxy's certificate chain and its private key are (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// One acceptor per port, because each offers its own ALPN protocol.
#[derive(Clone)]
pub struct TlsAcceptors {
    pub grpc: TlsAcceptor,
    pub http: TlsAcceptor,
}

impl TlsFiles {
    /// Reads and checks both files: a missing file, a file without a certificate or key, or a key
    /// that does not belong to the certificate fails here, at startup, with the file named.
    pub fn load(&self) -> Result<TlsAcceptors, ProxyError> {
        let chain = read_chain(&self.cert_file)?;
        let key = read_key(&self.key_file)?;
        let config = |alpn: &[u8]| -> Result<TlsAcceptor, ProxyError> {
            let mut config =
                rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ProxyError::Config(format!("TLS: {e}")))?
                    .with_no_client_auth()
                    .with_single_cert(chain.clone(), key.clone_key())
                    .map_err(|e| {
                        ProxyError::Config(format!(
                            "TLS: the key in {} does not fit the certificate in {}: {e}",
                            self.key_file.display(),
                            self.cert_file.display()
                        ))
                    })?;
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        Ok(TlsAcceptors { grpc: config(b"h2")?, http: config(b"http/1.1")? })
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, ProxyError> {
    let unreadable =
        |e: std::io::Error| ProxyError::Config(format!("TLS: cannot read the {what} file {}: {e}", path.display()));
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size > PEM_FILE_MAX_BYTES {
        return Err(ProxyError::Config(format!(
            "TLS: the {what} file {} has {size} bytes; a PEM {what} file is at most {PEM_FILE_MAX_BYTES}",
            path.display()
        )));
    }
    std::fs::read(path).map_err(unreadable)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProxyError> {
    let pem = read_pem(path, "certificate")?;
    let mut chain = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            ProxyError::Config(format!("TLS: the certificate file {} is not valid PEM: {e}", path.display()))
        })?;
        if chain.len() == CHAIN_CERTIFICATES_MAX {
            return Err(ProxyError::Config(format!(
                "TLS: the certificate file {} holds more than {CHAIN_CERTIFICATES_MAX} certificates",
                path.display()
            )));
        }
        chain.push(cert);
    }
    if chain.is_empty() {
        return Err(ProxyError::Config(format!(
            "TLS: the certificate file {} holds no \"BEGIN CERTIFICATE\" block",
            path.display()
        )));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ProxyError> {
    let pem = read_pem(path, "key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        ProxyError::Config(format!(
            "TLS: the key file {} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            path.display()
        ))
    })
}

/// A plaintext client on a TLS port is logged at most this often: it usually retries in a loop.
const PLAINTEXT_WARNING_INTERVAL_SECS: u64 = 60;
/// Connections accepted on the HTTP port but not yet through their handshake, at most.
const HTTP_HANDSHAKES_PENDING_MAX: usize = 256;
/// What a plaintext HTTP/1 client on the HTTPS port is told before the connection closes.
const PLAINTEXT_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\
Content-Length: 49\r\n\r\nthis port speaks HTTPS: use an https:// address\r\n";

/// Logs (rate-limited) that a client spoke plaintext to a TLS port, with the fix.
pub fn warn_plaintext_client(port: &str) {
    static LAST_WARNED_SECS: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = LAST_WARNED_SECS.load(Ordering::Relaxed);
    if (last == 0 || now.saturating_sub(last) >= PLAINTEXT_WARNING_INTERVAL_SECS)
        && LAST_WARNED_SECS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        tracing::warn!(
            port,
            "a client connected without TLS to the {port} port, which has TLS on; it was refused. \
             Turn TLS on in the client (Python: tls_enable=True; Node.js: sslEnabled: true; sluice: --tls)"
        );
    }
}

/// The HTTP port's listener under TLS: handshakes run in their own tasks (bounded in number and
/// in time), so one slow client does not hold up the others.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    _accepting: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor, handshake_timeout: Duration) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(HTTP_HANDSHAKES_PENDING_MAX);
        let pending = Arc::new(tokio::sync::Semaphore::new(HTTP_HANDSHAKES_PENDING_MAX));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok(permit) = pending.clone().acquire_owned().await else { return };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(handshake_timeout, handshake(stream, &acceptor)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(why)) => tracing::debug!(%peer, "closed an HTTP connection: {why}"),
                        Err(_) => {
                            tracing::debug!(%peer, "closed an HTTP connection that did not finish its TLS handshake in time")
                        }
                    }
                });
            }
        });
        Ok(TlsListener { ready, local, _accepting: AbortOnDrop(accepting) })
    }
}

/// The handshake, or a plain-text answer to a client that sent plain HTTP.
async fn handshake(
    mut stream: TcpStream,
    acceptor: &TlsAcceptor,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    // A TLS connection starts with a handshake record (0x16); an HTTP/1 request with a method name.
    let mut first = [0u8; 1];
    if matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_alphabetic()) {
        warn_plaintext_client("HTTP");
        // Read the request head first: closing with unread bytes makes the kernel send a reset,
        // and the client would see that instead of the answer.
        read_request_head(&mut stream).await;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, PLAINTEXT_HTTP_ANSWER).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        return Err("a plaintext HTTP client on the HTTPS port".into());
    }
    acceptor.accept(stream).await.map_err(|e| format!("TLS handshake failed: {e}"))
}

/// The most of a plaintext request read before answering it: enough for any sane request head.
const PLAINTEXT_REQUEST_HEAD_MAX_BYTES: usize = 16 * 1024;

/// Reads until the end of an HTTP/1 request head, the byte limit, or the end of the stream.
async fn read_request_head(stream: &mut TcpStream) {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while head.len() < PLAINTEXT_REQUEST_HEAD_MAX_BYTES && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(stream, &mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept task ended (its listener failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        TlsFiles { cert_file, key_file }
    }

    fn error(files: &TlsFiles) -> String {
        match files.load() {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles { cert_file: dir.path().join("none.pem"), key_file: dir.path().join("k.pem") };
        let e = error(&files);
        assert!(e.contains("cannot read the certificate file") && e.contains("none.pem"), "{e}");
    }

    #[test]
    fn files_without_pem_blocks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = error(&files(dir.path(), "not a certificate\n", "not a key\n"));
        assert!(e.contains("holds no \"BEGIN CERTIFICATE\" block"), "{e}");
    }

    #[test]
    fn garbage_inside_a_pem_block_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cert = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = error(&files(dir.path(), cert, "x"));
        assert!(e.contains("is not valid PEM"), "{e}");
    }
}
