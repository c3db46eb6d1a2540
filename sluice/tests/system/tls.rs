//! TLS on the proxy's gRPC and HTTP ports, with certificates made by `openssl` for each test: a
//! client that trusts the CA sends and receives; a plaintext client, a client that trusts
//! another CA, and plain HTTP on the HTTPS port are refused, each in its own recognisable way;
//! a bad certificate or key stops startup with the file named.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{cli, http_get, Local};

/// A CA, a server certificate it signed for 127.0.0.1 and localhost, and a second CA that signed
/// nothing the proxy holds.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub other_ca: PathBuf,
    pub other_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (scripts/setup.sh installs it): {e}"));
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn new_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
}

impl TestCerts {
    pub fn make(dir: &Path) -> TestCerts {
        new_ca(dir, "sluice-test-ca");
        new_ca(dir, "other-ca");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write the extensions file");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "sluice-test-ca.pem",
                "-CAkey",
                "sluice-test-ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
        TestCerts {
            ca: dir.join("sluice-test-ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            other_ca: dir.join("other-ca.pem"),
            other_key: dir.join("other-ca.key"),
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

async fn start_tls(certs: &TestCerts) -> Local {
    Local::start_with(&["--auto-create-topics", "--tls-cert", path(&certs.cert), "--tls-key", path(&certs.key)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trusts_the_ca_sends_and_receives_over_tls() {
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let certs = TestCerts::make(certs_dir.path());
    let local = start_tls(&certs).await;
    let endpoint = local.endpoint();
    let ca = path(&certs.ca);

    let (ok, stdout, stderr) =
        cli(&["send", "--endpoint", &endpoint, "--tls-ca", ca, "--topic", "tls-topic", "one", "two"]).await;
    assert!(ok, "send over TLS\nstdout: {stdout}\nstderr: {stderr}");
    let (ok, stdout, stderr) = cli(&[
        "--json",
        "consume",
        "--endpoint",
        &endpoint,
        "--tls-ca",
        ca,
        "--topic",
        "tls-topic",
        "--group",
        "g",
        "--count",
        "2",
    ])
    .await;
    assert!(ok, "consume over TLS\nstdout: {stdout}\nstderr: {stderr}");
    let bodies: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("a JSON line")["body"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(bodies.len(), 2, "{stdout}");
    assert!(bodies.contains(&"one".to_string()) && bodies.contains(&"two".to_string()), "{stdout}");

    // HTTPS on the HTTP port, checked by curl against the same CA.
    let url = format!("https://{}/healthz", local.http);
    let output =
        Command::new("curl").args(["-sS", "--max-time", "10", "--cacert", ca, &url]).output().expect("run curl");
    assert!(output.status.success(), "curl {url}: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_untrusting_clients_are_refused() {
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let certs = TestCerts::make(certs_dir.path());
    let local = start_tls(&certs).await;
    let endpoint = local.endpoint();

    // A plaintext gRPC client: the proxy closes the connection, and says why in its log.
    let (ok, _, stderr) = cli(&["topic", "list", "--endpoint", &endpoint]).await;
    assert!(!ok, "a plaintext client was served by a TLS port: {stderr}");
    let logs = local.process.logs();
    assert!(logs.contains("without TLS to the gRPC port"), "no warning about the plaintext client:\n{logs}");

    // A TLS client that trusts only another CA: it refuses the proxy's certificate.
    let (ok, _, stderr) = cli(&["topic", "list", "--endpoint", &endpoint, "--tls-ca", path(&certs.other_ca)]).await;
    assert!(!ok, "a client trusting another CA accepted the proxy's certificate");
    assert!(stderr.contains("certificate"), "the error does not say it is the certificate: {stderr}");

    // Plain HTTP on the HTTPS port: a 400 that says what to use instead.
    let (status, body) = http_get(local.http, "/healthz").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("use an https:// address"), "{body}");

    // And the proxy still serves a client that does it right.
    let (ok, stdout, stderr) = cli(&["topic", "list", "--endpoint", &endpoint, "--tls-ca", path(&certs.ca)]).await;
    assert!(ok, "topic list over TLS after the refusals\nstdout: {stdout}\nstderr: {stderr}");
}

/// Runs `sluice local` with these TLS files and returns its error output; it must fail to start.
async fn refused_at_startup(cert: &Path, key: &Path) -> String {
    let data = tempfile::tempdir().expect("tempdir");
    let (ok, stdout, stderr) = cli(&[
        "local",
        "--data-dir",
        path(data.path()),
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--tls-cert",
        path(cert),
        "--tls-key",
        path(key),
    ])
    .await;
    assert!(!ok, "sluice local started with a bad TLS setup\nstdout: {stdout}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_or_key_stops_startup_with_the_file_named() {
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let certs = TestCerts::make(certs_dir.path());

    let missing = certs_dir.path().join("missing.pem");
    let e = refused_at_startup(&missing, &certs.key).await;
    assert!(e.contains("cannot read the certificate file") && e.contains("missing.pem"), "{e}");

    // The other CA's key does not belong to the server certificate.
    let e = refused_at_startup(&certs.cert, &certs.other_key).await;
    assert!(e.contains("does not fit the certificate"), "{e}");

    // A key file given as the certificate.
    let e = refused_at_startup(&certs.key, &certs.key).await;
    assert!(e.contains("holds no \"BEGIN CERTIFICATE\" block"), "{e}");

    // Half a TLS setup is a usage error.
    let (ok, _, stderr) = cli(&["local", "--tls-cert", path(&certs.cert)]).await;
    assert!(!ok && stderr.contains("--tls-key"), "{stderr}");
}
