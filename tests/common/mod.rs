//! Helpers for integration tests: node configs on loopback, a raw `/ipfs/kad/1.0.0` client (for
//! messages a well-behaved client never sends), and a real rust-libp2p kad client.
#![allow(dead_code)]

pub mod pg;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use hydra::config::{AddressFilter, ConfigFile, StoreKind};
use hydra::net::wire::{self, MessageType, PbMessage};
use hydra::net::KAD_PROTOCOL;
use hydra::types::PeerRecord;
use hydra::{Config, Node};
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, tcp, yamux, Multiaddr, PeerId, Stream, Swarm};

/// `[load]` settings for functional tests of `hydra` processes: the tier pinned to normal and no
/// per-peer limit, so results do not depend on how busy the machine is (as [`config`] does).
pub const STABLE_LOAD_TOML: &str =
    "[load]\nforce_tier = \"normal\"\nper_peer_requests_per_second = 0\nstream_queue_max_wait = \"10s\"\n";

/// Bound for any single wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// The shipped defaults, changed only where a test network needs it: `heads` heads on 127.0.0.1,
/// ephemeral ports, store in `dir`, a node name of its own, `address_filter = "any"` (the peers'
/// addresses are loopback ones, which the public filter drops).
fn loopback_file(dir: &Path, heads: usize) -> ConfigFile {
    let mut f = ConfigFile {
        heads,
        // Distinct per node: processes sharing a datastore are told apart by name.
        node_name: format!("test-{:08x}", rand::random::<u32>()),
        listen_ip: "127.0.0.1".into(),
        http_listen: "127.0.0.1:0".into(),
        data_dir: dir.to_owned(),
        ..Default::default()
    };
    f.routing.address_filter = AddressFilter::Any;
    f
}

/// A config for a node with `heads` heads on 127.0.0.1, ephemeral ports, store in `dir`.
pub fn config(dir: &Path, heads: usize) -> Config {
    let mut f = loopback_file(dir, heads);
    f.providers.flush_interval = Duration::from_millis(50);
    // Functional tests must not depend on how busy the machine is: deadline sheds are a load
    // behaviour, tested where load is the subject.
    f.providers.read_deadline = Duration::from_secs(10);
    // Likewise tiers, admission by rate (the runtime lag of a test binary running many nodes
    // at once on a shared machine) and per-peer limits: pinned to normal and off, except in
    // tests/load.rs.
    f.load.force_tier = Some(hydra::load::Tier::Normal);
    f.load.degrade.runtime_lag_ms = 0.0;
    f.load.admission_lag_ms = 0.0;
    f.load.per_peer_requests_per_second = 0;
    f.load.stream_queue_max_wait = Duration::from_secs(10);
    f.validate().expect("test config is valid")
}

/// A node with the **shipped defaults** ([`loopback_file`]): tiers are computed; deadlines,
/// per-peer limits and queue waits are the shipped ones.
pub async fn shipped_config_on(dir: &Path, heads: usize, backend: Backend) -> Config {
    let f = loopback_file(dir, heads);
    let mut c = f.validate().expect("test config is valid");
    if backend == Backend::Postgres {
        c.store = StoreKind::Postgres(pg::fresh_database().await);
    }
    c
}

/// Which datastore a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A test config on `backend` (a fresh database for PostgreSQL).
pub async fn config_on(dir: &Path, heads: usize, backend: Backend) -> Config {
    let mut c = config(dir, heads);
    if backend == Backend::Postgres {
        c.store = StoreKind::Postgres(pg::fresh_database().await);
    }
    c
}

pub async fn start(dir: &Path, heads: usize, backend: Backend) -> Node {
    Node::start(config_on(dir, heads, backend).await).await.expect("node starts")
}

/// Generate one test per backend from `async fn name(backend: Backend)` functions.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// The TCP port of an address (None: no `/tcp/`).
pub fn tcp_port(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(port),
        _ => None,
    })
}

/// (peer id, TCP address) of every head.
pub fn head_addrs(node: &Node) -> Vec<(PeerId, Multiaddr)> {
    node.heads()
        .iter()
        .map(|h| {
            let tcp = h
                .listen_addrs
                .load()
                .iter()
                .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
                .cloned()
                .expect("head has a TCP address");
            (h.peer_id, tcp)
        })
        .collect()
}

/// Sum of the metric series named `name` carrying all `labels` (0 if none), read from the text
/// exposition format, as Prometheus would see it.
pub fn metric(node: &Node, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry_metric(node.registry(), name, labels)
}

/// [`metric`] for a registry that outlived its node.
pub fn registry_metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
    sum_samples(&String::from_utf8(buf).unwrap(), name, labels)
}

/// The sum of the samples of metric `name` in a Prometheus text scrape whose labels include
/// `labels`.
pub fn sum_samples(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            sum += rest.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        }
    }
    sum
}

pub fn transport_swarm<B: NetworkBehaviour>(make: impl FnOnce(&libp2p::identity::Keypair) -> B) -> Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|k| make(k))
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

pub async fn listen_local<B: NetworkBehaviour>(swarm: &mut Swarm<B>) -> Multiaddr {
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                return address;
            }
        }
    })
    .await
    .expect("client listens")
}

/// A `hydra run` child process.
pub struct Process {
    pub child: std::process::Child,
    pub http: String,
    pub lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Process {
    /// Start the binary with `args` (JSON logs on stdout) and wait for "node started".
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Process {
        Self::launch(args, envs).started()
    }

    /// Start the binary without waiting for it (see [`Launched::started`]).
    pub fn launch(args: &[&str], envs: &[(&str, &str)]) -> Launched {
        Self::launch_bin(std::path::Path::new(env!("CARGO_BIN_EXE_hydra")), args, envs)
    }

    /// Like [`Self::launch`], with another `hydra` binary (e.g. a previous release).
    pub fn launch_bin(bin: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Launched {
        let mut cmd = std::process::Command::new(bin);
        cmd.env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("HYDRA_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .args(args)
            .args(["--log-format", "json"])
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn hydra");
        Launched(Some(child))
    }

    /// Kill with SIGKILL (no shutdown, no flush, leases left to expire).
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    } // Drop: kill/wait again are no-ops on an exited child
}

impl Drop for Process {
    /// A failing test must not leave a node running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `hydra` process that may not have started yet.
pub struct Launched(Option<std::process::Child>);

impl Drop for Launched {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Launched {
    /// Wait until the node logs "node started".
    pub fn started(mut self) -> Process {
        use std::io::BufRead;
        let mut child = self.0.take().expect("not started yet");
        // A node that never starts is killed after a while, so the test fails here instead of
        // hanging the whole run.
        let (started, watchdog) = std::sync::mpsc::sync_channel::<()>(1);
        let pid = child.id() as libc::pid_t;
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watchdog.recv_timeout(2 * WAIT) {
                // SAFETY: plain kill(2) of our own child, which has not been waited for yet.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let http = loop {
            let line = lines.next().and_then(Result::ok).expect("node logs until it has started");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["fields"]["message"] == "node started" {
                break v["fields"]["http"].as_str().unwrap().to_string();
            }
        };
        let _ = started.send(());
        Process { child, http, lines }
    }
}

impl Process {
    /// The sum of the samples of metric `name` on the process's `/metrics` whose labels include
    /// `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.get("/metrics"), name, labels)
    }

    /// GET `path` from the process's HTTP server; returns the body.
    pub fn get(&self, path: &str) -> String {
        String::from_utf8_lossy(&self.get_bytes(path).1).into_owned()
    }

    /// GET `path` from the process's HTTP server; returns (status code, body bytes). Blocking
    /// (std sockets), so it also works inside async tests.
    pub fn get_bytes(&self, path: &str) -> (u16, Vec<u8>) {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(&self.http).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        write!(sock, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = Vec::new();
        sock.read_to_end(&mut out).unwrap();
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete HTTP head");
        let head = String::from_utf8_lossy(&out[..split]);
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, out[split + 4..].to_vec())
    }

    /// Heads listed by `/v1/heads`, as (peer id, TCP address).
    pub fn heads(&self) -> Vec<(PeerId, Multiaddr)> {
        let heads: Vec<hydra::http::HeadInfo> = serde_json::from_str(&self.get("/v1/heads")).unwrap();
        heads
            .into_iter()
            .map(|h| {
                let tcp = h.addrs.iter().find(|a| a.contains("/tcp/")).unwrap().parse().unwrap();
                (h.peer_id.parse().unwrap(), tcp)
            })
            .collect()
    }

    /// SIGTERM, then wait (bounded) for exit; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = std::time::Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A client speaking the raw kad wire protocol over real libp2p connections.
pub struct RawClient {
    pub peer_id: PeerId,
    /// An address this client listens on (announced in ADD_PROVIDER).
    pub addr: Multiaddr,
    control: libp2p_stream::Control,
    _driver: tokio::task::JoinHandle<()>,
}

impl RawClient {
    /// Connect to every given peer, then keep the swarm running in the background.
    pub async fn connect(peers: &[(PeerId, Multiaddr)]) -> Self {
        let mut swarm = transport_swarm(|_| libp2p_stream::Behaviour::new());
        let addr = listen_local(&mut swarm).await;
        Self::connected(swarm, addr, peers).await
    }

    /// Like [`Self::connect`], but every connection's source address is `src` (any of
    /// 127.0.0.0/8), as a client on another host would have: for per-IP limits on loopback. The
    /// client does not listen; its announced address is `src` itself.
    pub async fn connect_from(src: std::net::Ipv4Addr, peers: &[(PeerId, Multiaddr)]) -> Self {
        let swarm = hydra_testkit::bound_swarm(src, |_| libp2p_stream::Behaviour::new());
        let addr: Multiaddr = format!("/ip4/{src}/tcp/1").parse().unwrap();
        Self::connected(swarm, addr, peers).await
    }

    async fn connected(
        mut swarm: Swarm<libp2p_stream::Behaviour>,
        addr: Multiaddr,
        peers: &[(PeerId, Multiaddr)],
    ) -> Self {
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().new_control();
        let mut want: HashSet<PeerId> = peers.iter().map(|p| p.0).collect();
        for (p, a) in peers {
            swarm.dial(a.clone().with(Protocol::P2p(*p))).unwrap();
        }
        tokio::time::timeout(WAIT, async {
            while !want.is_empty() {
                if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
                    want.remove(&peer_id);
                }
            }
        })
        .await
        .expect("raw client connects to every head");
        let driver = tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        Self { peer_id, addr, control, _driver: driver }
    }

    pub async fn open(&self, peer: PeerId) -> Stream {
        self.try_open(peer).await.expect("open kad stream")
    }

    /// Open a kad stream; Err if the node refused it (a reset before negotiation completed).
    pub async fn try_open(&self, peer: PeerId) -> Result<Stream, libp2p_stream::OpenStreamError> {
        let mut c = self.control.clone();
        tokio::time::timeout(WAIT, c.open_stream(peer, KAD_PROTOCOL)).await.expect("open stream in time")
    }

    /// Open a stream and send one request on it: the reply, or None if the node refused the
    /// stream (at opening or before replying).
    pub async fn try_request(&self, peer: PeerId, body: &[u8]) -> Option<PbMessage> {
        let mut s = self.try_open(peer).await.ok()?;
        Self::request(&mut s, body).await.ok()
    }

    /// Send one request on a stream and read the reply.
    pub async fn request(s: &mut Stream, body: &[u8]) -> std::io::Result<PbMessage> {
        wire::write_frame(s, body).await?;
        let len = tokio::time::timeout(WAIT, wire::read_length(s))
            .await
            .map_err(|_| std::io::Error::other("reply timed out"))?
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        let body = wire::read_body(s, len).await.map_err(std::io::Error::other)?;
        wire::decode_message(&body).map_err(std::io::Error::other)
    }

    /// Send a message that has no reply (ADD_PROVIDER).
    pub async fn send(s: &mut Stream, body: &[u8]) -> std::io::Result<()> {
        wire::write_frame(s, body).await
    }

    pub fn add_provider_body(&self, key: &[u8]) -> Vec<u8> {
        wire::encode_request(
            MessageType::AddProvider,
            key,
            &[PeerRecord { peer: self.peer_id, addrs: vec![self.addr.clone()] }],
        )
    }

    pub async fn get_providers(&self, head: PeerId, key: &[u8]) -> PbMessage {
        let mut s = self.open(head).await;
        Self::request(&mut s, &wire::encode_request(MessageType::GetProviders, key, &[]))
            .await
            .expect("GET_PROVIDERS reply")
    }
}

#[derive(NetworkBehaviour)]
pub struct ClientBehaviour {
    identify: identify::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// A stock rust-libp2p kad client (client mode) with an external address to announce.
pub struct KadClient {
    pub swarm: Swarm<ClientBehaviour>,
    pub addr: Multiaddr,
}

impl KadClient {
    pub async fn new(heads: &[(PeerId, Multiaddr)]) -> Self {
        let mut swarm = transport_swarm(|k| {
            let id = k.public().to_peer_id();
            let mut kad = kad::Behaviour::with_config(
                id,
                kad::store::MemoryStore::new(id),
                kad::Config::new(KAD_PROTOCOL),
            );
            kad.set_mode(Some(kad::Mode::Client));
            ClientBehaviour {
                identify: identify::Behaviour::new(identify::Config::new("ipfs/0.1.0".into(), k.public())),
                kad,
            }
        });
        let addr = listen_local(&mut swarm).await;
        swarm.add_external_address(addr.clone());
        for (p, a) in heads {
            swarm.behaviour_mut().kad.add_address(p, a.clone());
        }
        Self { swarm, addr }
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Drive the swarm until query `id` reports its last step; return every step's result.
    pub async fn finish(&mut self, id: QueryId) -> Vec<QueryResult> {
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, async {
            loop {
                if let SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                    kad::Event::OutboundQueryProgressed { id: qid, result, step, .. },
                )) = self.swarm.select_next_some().await
                {
                    if qid == id {
                        out.push(result);
                        if step.last {
                            return;
                        }
                    }
                }
            }
        })
        .await
        .expect("kad query finishes in time");
        out
    }

    /// Keep the swarm running until `done()` holds (checked every 20 ms).
    pub async fn drive_until(&mut self, mut done: impl FnMut() -> bool) {
        // One timer for the whole wait: a sleep re-created per swarm event never fires while
        // events keep coming.
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tokio::time::timeout(WAIT, async {
            loop {
                tokio::select! {
                    _ = self.swarm.select_next_some() => {}
                    _ = tick.tick() => if done() { return },
                }
            }
        })
        .await
        .expect("condition reached in time");
    }

    pub async fn providers(&mut self, key: kad::RecordKey) -> HashSet<PeerId> {
        let id = self.swarm.behaviour_mut().kad.get_providers(key);
        let mut found = HashSet::new();
        for r in self.finish(id).await {
            if let QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders { providers, .. })) = r {
                found.extend(providers);
            }
        }
        found
    }
}

/// `GET path` from an HTTP server on `addr` (HTTP/1.0: the body ends when the connection does).
/// Returns (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// `method path` (no body) to an HTTP server on `addr`; returns (status code, body).
pub async fn http_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    let r = http_call(addr.parse().expect("a socket address"), method, path, &[], b"").await;
    (r.status, r.text())
}

/// Percent-encode a query-string value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP exchange as a test sees it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// `method path` with `headers` and `body` to `addr` from source address `src` (HTTP/1.0: the
/// body ends when the connection does).
pub async fn http_call_from(
    src: std::net::Ipv4Addr,
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::new(src.into(), 0)).unwrap();
    let mut sock = sock.connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    sock.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, sock.read_to_end(&mut out)).await.expect("HTTP reply in time").unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete HTTP head");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpReply { status, headers, body: out[split + 4..].to_vec() }
}

/// [`http_call_from`] 127.0.0.1.
pub async fn http_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    http_call_from(std::net::Ipv4Addr::LOCALHOST, addr, method, path, headers, body).await
}
