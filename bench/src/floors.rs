//! The machine's floors: the least the controller's figures could cost on this machine,
//! measured in the same run so that every figure can be read as a ratio to what the
//! hardware allows (issue 28).
//!
//! - storage: one small write and its fsync, in the directory the controller's store
//!   would use: the least an acknowledged grant can wait for;
//! - broadcast: a minimal tokio + rustls server (its own runtime and threads, as the
//!   controller has its own process) writing one record the size of a one-lease watch
//!   message to N mutual-TLS connections, received by N simulated nodes as in the
//!   fan-out scenario: the least a fan-out to N can cost here;
//! - handshakes and signatures: N mutual-TLS handshakes with the nodes' certificates
//!   and N ECDSA P-256 signatures: the least a cold start of N can cost;
//! - a server process (this binary again, started with [`SERVE_ENV`]) that holds N
//!   idle mutual-TLS connections and then sends each of them N leases' worth of bytes:
//!   its RSS per connection is the least memory a connected agent can cost without
//!   HTTP/2, and its time and CPU for the handshakes and the N² leases are the least a
//!   join storm of N can cost (every node learns every lease).

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::pki::Pki;
use crate::procstat;
use crate::sim;
use crate::stats::Dist;
use crate::twill::CONNECT_PARALLEL;

/// Small writes timed for the storage floor.
const FSYNCS: usize = 200;
/// Broadcast rounds, spaced as the fan-out scenario's joins are.
const ROUNDS: usize = 20;
const ROUND_GAP: Duration = Duration::from_millis(100);

/// Set to a PKI directory, `twill-bench` is the floor server process instead (see
/// [`serve_process`]).
pub const SERVE_ENV: &str = "TWILL_BENCH_FLOOR_SERVER";

/// What HTTP/2 (h2 0.4, under tonic and hyper) allocates for every connection whatever it
/// carries, none of it configurable: its write buffer (16 KiB, `codec/framed_write.rs`
/// `DEFAULT_BUFFER_CAPACITY`), its read buffer (8 KiB, tokio-util's `FramedRead`) and
/// its header decoder's buffer (4 KiB, `hpack/decoder.rs`). Measured with heaptrack in
/// the controller: 2,000 connections, 2,000 of each.
pub const HTTP2_FIXED_BYTES: usize = (16 + 8 + 4) * 1024;

/// The floors at N nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Floors {
    /// N.
    pub nodes: usize,
    /// One small write + fsync, ms.
    pub fsync_ms: Dist,
    /// Bytes of the broadcast record (a one-lease watch message as framed on the wire).
    pub record_bytes: usize,
    /// Broadcast rounds.
    pub rounds: usize,
    /// Record sent → received at each of the N connections, ms, over all rounds.
    pub broadcast_ms: Dist,
    /// N mutual-TLS handshakes, at most [`CONNECT_PARALLEL`] at once, s.
    pub handshakes_s: f64,
    /// N ECDSA P-256 signatures one after another, s.
    pub signatures_s: f64,
    /// The server process's RSS per idle mutual-TLS connection (one record sent on
    /// each), KB: (RSS with N − RSS with none) / N.
    pub conn_kb: f64,
    /// Bytes of one lease event inside a watch message of many (what a storm's
    /// merged messages carry per lease).
    pub lease_bytes: usize,
    /// The server process: N handshakes, s.
    pub storm_handshakes_s: f64,
    /// Then N leases' bytes to each of the N connections, until all received, s.
    pub storm_transfer_s: f64,
    /// The server process's CPU for that transfer, s.
    pub storm_server_cpu_s: f64,
}

/// Measures the floors at `n` nodes with the nodes' certificates from `pki`.
pub async fn measure(pki: &mut Pki, n: usize) -> Result<Floors> {
    let names: Vec<String> = (0..n).map(sim::node_name).collect();
    pki.ensure_nodes(&names)?;
    let fsync_ms = fsyncs(&std::env::temp_dir())?;
    let signatures_s = signatures(n)?;
    let record = record();
    let (handshakes_s, broadcast_ms) = broadcast(pki, &names, record.clone()).await?;
    let lease_bytes = lease_bytes();
    let storm = process_floor(pki, &names, lease_bytes).await?;
    Ok(Floors {
        nodes: n,
        fsync_ms,
        record_bytes: record.len(),
        rounds: ROUNDS,
        broadcast_ms,
        handshakes_s,
        signatures_s,
        conn_kb: storm.conn_kb,
        lease_bytes,
        storm_handshakes_s: storm.handshakes_s,
        storm_transfer_s: storm.transfer_s,
        storm_server_cpu_s: storm.server_cpu_s,
    })
}

/// What [`process_floor`] measured.
struct ProcessFloor {
    conn_kb: f64,
    handshakes_s: f64,
    transfer_s: f64,
    server_cpu_s: f64,
}

/// What every connection receives first: an idle connection has written and read
/// once, as a watch that got its snapshot.
const FIRST_RECORD: usize = 64;

/// Starts the floor server process, connects one mutual-TLS client per name, reads its
/// RSS with none and with all connected, then has it send `lease_bytes` × N bytes to
/// every connection and times their arrival.
async fn process_floor(pki: &Pki, names: &[String], lease_bytes: usize) -> Result<ProcessFloor> {
    let n = names.len();
    let mut child = Command::new(std::env::current_exe()?)
        .env(SERVE_ENV, pki.path(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the floor server process")?;
    let pid = child.id();
    let mut commands = child.stdin.take().context("the floor server's stdin")?;
    let mut replies = std::io::BufReader::new(child.stdout.take().context("its stdout")?);
    // A pipe to a child that answers at once; the runtime is told this thread blocks.
    let mut ask = |command: String| -> Result<String> {
        tokio::task::block_in_place(|| {
            writeln!(commands, "{command}")?;
            commands.flush()?;
            let mut line = String::new();
            replies.read_line(&mut line)?;
            anyhow::ensure!(!line.is_empty(), "the floor server process ended");
            Ok(line.trim().to_string())
        })
    };
    let result = async {
        let addr: std::net::SocketAddr = ask("addr".into())?.parse()?;
        let rss0 = procstat::rss_mb(pid).unwrap_or(f64::NAN);
        let storm_len = lease_bytes * n;
        let trusted = Arc::new(roots(pki)?);
        let (got_tx, mut got_rx) = mpsc::unbounded_channel::<usize>();
        let sem = Arc::new(Semaphore::new(CONNECT_PARALLEL));
        let started = Instant::now();
        let mut readers = JoinSet::new();
        for name in names {
            let connector = TlsConnector::from(client_tls(pki, &trusted, name)?);
            let sem = sem.clone();
            let got = got_tx.clone();
            readers.spawn(async move {
                let mut tls = connect(addr, &connector, sem).await?;
                let mut buf = vec![0u8; 16 * 1024];
                for (phase, mut left) in [FIRST_RECORD, storm_len].into_iter().enumerate() {
                    while left > 0 {
                        let want = left.min(buf.len());
                        let got = tls.read(&mut buf[..want]).await?;
                        anyhow::ensure!(got > 0, "the floor server closed a connection");
                        left -= got;
                    }
                    let _ = got.send(phase);
                }
                // Held open until the end, as a watch is.
                let _ = tls.read(&mut buf).await;
                Ok::<_, anyhow::Error>(())
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut connected = 0;
        while connected < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            connected = ask("connections".into())?.parse()?;
        }
        let handshakes_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(connected == n, "{connected} of {n} connections after 120 s");
        ask(format!("send {FIRST_RECORD}"))?;
        all_received(&mut got_rx, n, 0).await?;
        // Memory freed after the handshakes leaves the RSS lazily: give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_n = procstat::rss_mb(pid).unwrap_or(f64::NAN);
        let cpu0 = procstat::cpu(pid).unwrap_or_default();
        let sent = Instant::now();
        ask(format!("send {storm_len}"))?;
        all_received(&mut got_rx, n, 1).await?;
        let transfer_s = sent.elapsed().as_secs_f64();
        let server_cpu_s = (procstat::cpu(pid).unwrap_or_default() - cpu0).as_secs_f64();
        readers.abort_all();
        Ok(ProcessFloor {
            conn_kb: (rss_n - rss0) * 1024.0 / n as f64,
            handshakes_s,
            transfer_s,
            server_cpu_s,
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Waits until `n` readers said they received all of `phase`.
async fn all_received(
    rx: &mut mpsc::UnboundedReceiver<usize>,
    n: usize,
    phase: usize,
) -> Result<()> {
    let mut left = n;
    while left > 0 {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
            Ok(Some(p)) if p == phase => left -= 1,
            Ok(Some(_)) => {}
            _ => anyhow::bail!("{left} of {n} connections did not receive phase {phase}"),
        }
    }
    Ok(())
}

/// The floor server process: a minimal tokio + rustls server (two worker threads, as
/// the machine has two cores) with the controller's certificate from the PKI directory
/// `dir`, node certificates required. It answers one line per command line on stdin:
/// `addr` (its address), `connections` (handshakes done), `send N` (N bytes queued to
/// every connection; `ok`). It ends with its stdin.
pub fn serve_process(dir: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = server_config(
        &std::fs::read_to_string(dir.join("server.crt"))?,
        &std::fs::read_to_string(dir.join("server.key"))?,
        &std::fs::read_to_string(dir.join("ca.crt"))?,
    )?;
    let (tx, _) = broadcast::channel::<Bytes>(4);
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(serve(listener, TlsAcceptor::from(server), tx.clone()));
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match line.split_once(' ') {
            None if line == "addr" => addr.to_string(),
            None if line == "connections" => tx.receiver_count().to_string(),
            Some(("send", n)) => {
                let _ = tx.send(Bytes::from(vec![0u8; n.parse()?]));
                "ok".into()
            }
            _ => anyhow::bail!("unknown floor server command {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// [`FSYNCS`] writes of 128 bytes, each made durable, in `dir`.
fn fsyncs(dir: &std::path::Path) -> Result<Dist> {
    let mut f = tempfile::tempfile_in(dir).context("a file for the storage floor")?;
    let block = [7u8; 128];
    let mut samples = Vec::with_capacity(FSYNCS);
    for _ in 0..FSYNCS {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Dist::of(samples))
}

/// `n` ECDSA P-256 signatures of a certificate-sized message, in seconds.
fn signatures(n: usize) -> Result<f64> {
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("reading the P-256 key"))?;
    let tbs = [0x30u8; 600];
    let t = Instant::now();
    for _ in 0..n {
        key.sign(&rng, &tbs)
            .map_err(|_| anyhow::anyhow!("signing"))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// What a watcher receives for one new lease: a `WatchResponse` of one event as a gRPC
/// message in an HTTP/2 DATA frame.
fn record() -> Bytes {
    const HTTP2_FRAME: usize = 9;
    const GRPC_PREFIX: usize = 5;
    Bytes::from(vec![
        0u8;
        HTTP2_FRAME + GRPC_PREFIX + one_lease().encoded_len()
    ])
}

/// What one more lease adds to a watch message.
fn lease_bytes() -> usize {
    let one = one_lease();
    let none = twill_proto::WatchResponse {
        events: vec![],
        ..one.clone()
    };
    one.encoded_len() - none.encoded_len()
}

/// A watch message of one new lease.
fn one_lease() -> twill_proto::WatchResponse {
    let i = 0;
    let lease = twill_proto::Lease {
        node_name: sim::joiner_name(i),
        subnet: "10.255.0.0/24".into(),
        public_ip: sim::public_ip(i),
        backend_type: "vxlan".into(),
        vtep_mac: sim::vtep_mac(i, true),
        expires_at_unix: 1_900_000_000,
        revision: 5_001,
        vni: 1,
        ..Default::default()
    };
    twill_proto::WatchResponse {
        events: vec![twill_proto::LeaseEvent {
            r#type: twill_proto::lease_event::Type::Put as i32,
            revision: 5_001,
            lease: Some(lease),
        }],
        revision: 5_001,
        epoch: "0123456789abcdef".into(),
        ..Default::default()
    }
}

/// Connects one mutual-TLS client per name to a minimal server, then has the server
/// write `record` to all of them [`ROUNDS`] times; returns the handshakes' time (s)
/// and the deliveries (ms after each send).
async fn broadcast(pki: &Pki, names: &[String], record: Bytes) -> Result<(f64, Dist)> {
    let server = server_tls(pki)?;
    let (tx, _) = broadcast::channel::<Bytes>(ROUNDS + 1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_tx = tx.clone();
    // The server's own runtime on its own threads, as the controller has its own
    // process: the two sides compete for the cores as they do in the other scenarios.
    let thread = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            tokio::select! {
                r = serve(listener, TlsAcceptor::from(server), server_tx) => r,
                _ = stop_rx => Ok(()),
            }
        })
    });

    let len = record.len();
    // The CA is read once for all N clients.
    let trusted = Arc::new(roots(pki)?);
    let (got_tx, mut got_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let sem = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let started = Instant::now();
    let mut connects = JoinSet::new();
    for name in names {
        let connector = TlsConnector::from(client_tls(pki, &trusted, name)?);
        let sem = sem.clone();
        connects.spawn(async move { connect(addr, &connector, sem).await });
    }
    let mut readers = JoinSet::new();
    while let Some(conn) = connects.join_next().await {
        let mut tls = conn??;
        let got = got_tx.clone();
        readers.spawn(async move {
            let mut buf = vec![0u8; len];
            for round in 0..ROUNDS {
                if tls.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let _ = got.send((round, Instant::now()));
            }
        });
    }
    let handshakes_s = started.elapsed().as_secs_f64();
    // Every connection's server side is subscribed once the server counts them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tx.receiver_count() < names.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut samples = Vec::with_capacity(names.len() * ROUNDS);
    for round in 0..ROUNDS {
        tokio::time::sleep(ROUND_GAP).await;
        let sent = Instant::now();
        let _ = tx.send(record.clone());
        let until = sent + Duration::from_secs(15);
        let mut left = names.len();
        while left > 0 {
            let Ok(Some((r, at))) = tokio::time::timeout(
                until.saturating_duration_since(Instant::now()),
                got_rx.recv(),
            )
            .await
            else {
                break;
            };
            if r == round {
                samples.push(at.duration_since(sent).as_secs_f64() * 1e3);
                left -= 1;
            }
        }
    }
    readers.abort_all();
    let _ = stop_tx.send(());
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("the broadcast floor's server panicked"))??;
    Ok((handshakes_s, Dist::of(samples)))
}

/// One node's mutual-TLS connection to `addr`, at most [`CONNECT_PARALLEL`] handshakes
/// at once (`sem`), as the bench's nodes connect.
async fn connect(
    addr: std::net::SocketAddr,
    connector: &TlsConnector,
    sem: Arc<Semaphore>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let _permit = sem.acquire_owned().await?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?)
}

/// Accepts mutual-TLS connections and writes every record of `tx` to each, as the
/// controller's watch streams do with a shared, pre-encoded message.
async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: broadcast::Sender<Bytes>,
) -> Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut rx = tx.subscribe();
            while let Ok(record) = rx.recv().await {
                if tls.write_all(&record).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("certificate PEM")
}

fn roots(pki: &Pki) -> Result<rustls::RootCertStore> {
    roots_of(&pki.ca_pem)
}

fn roots_of(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// The server side: the controller's certificate, node certificates required.
fn server_tls(pki: &Pki) -> Result<Arc<rustls::ServerConfig>> {
    server_config(
        &std::fs::read_to_string(pki.path("server.crt"))?,
        &std::fs::read_to_string(pki.path("server.key"))?,
        &pki.ca_pem,
    )
}

fn server_config(cert: &str, key: &str, ca_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots_of(ca_pem)?.into(),
        provider.clone(),
    )
    .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?;
    Ok(Arc::new(config))
}

/// Node `name`'s side: trusts `roots` (the CA), presents its certificate.
fn client_tls(
    pki: &Pki,
    roots: &Arc<rustls::RootCertStore>,
    name: &str,
) -> Result<Arc<rustls::ClientConfig>> {
    let node = pki.node(name);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(
            certs(&node.cert_pem)?,
            PrivateKeyDer::from_pem_slice(node.key_pem.as_bytes())?,
        )?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_a_one_lease_watch_message_as_framed() {
        let r = record();
        assert!((100..300).contains(&r.len()), "{} bytes", r.len());
        assert!(
            (60..r.len() - 14).contains(&lease_bytes()),
            "{}",
            lease_bytes()
        );
    }
}
