//! The `hydra` binary: parse the command line, build the configuration, start tracing, and run
//! the node until SIGINT or SIGTERM. Everything else lives in the library; the benchmarks are a
//! separate binary (`cargo run --release -p hydra-bench -- …`, in `crates/hydra-bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// jemalloc, with its sampling heap profiler on from the start (`src/profiles.rs`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start: profiling on, one sample per 2^19 bytes (512 KiB)
/// allocated on average — cheap enough to stay on.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:true,lg_prof_sample:19\0";
use hydra::config::{AddressFilter, ConfigFile, LogFormat, Overrides};

#[derive(Parser)]
#[command(name = "hydra", version, about = "Many IPFS Amino DHT server heads sharing one provider store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node.
    Run(NodeArgs),
    /// Apply pending datastore migrations and exit (the node also applies them at start).
    Migrate(NodeArgs),
    /// List every head identity of the fleet with its node, addresses and lease state.
    Heads {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show the stored provider records of a CID (or multihash): providers, addresses, expiry.
    Providers {
        /// A CID (v0 `Qm…` or v1 `bafy…`) or a multihash (base58btc, multibase or hex).
        cid: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Most records shown (latest expiry first).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show a running node's load tier, signals, fills and record estimates (from its HTTP API
    /// at http_listen, or --url).
    Status {
        /// Print the node's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The node's operator API, e.g. http://127.0.0.1:7779 (default: from http_listen).
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Exit 0 if a running node is ready (`GET /readyz`: every head listens and the datastore
    /// answers), else 1 with the reason: for container health checks.
    Ready {
        /// The node's operator or metrics listener, e.g. http://127.0.0.1:7779 (default: from
        /// http_listen).
        #[arg(long)]
        url: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Simulations of what heads buy the network (no node, no network traffic).
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum SimCommand {
    /// Share of random keys whose 20 closest peers include a head, against the number of heads,
    /// for balanced head IDs (this node's identity schemes) and random ones and for ideal even
    /// spacing; and the heads needed for 90, 97 and 99 %.
    Coverage {
        /// Random peers in the simulated network.
        #[arg(long, default_value_t = 16_000)]
        peers: usize,
        /// Head counts to tabulate, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,250,500,1000,1500,2015,3000,5000")]
        heads: Vec<usize>,
        /// Random keys sampled.
        #[arg(long, default_value_t = 4000)]
        keys: usize,
        /// The most heads the search for the 90/97/99 % counts tries.
        #[arg(long, default_value_t = 20_000)]
        max_heads: usize,
        /// Candidates per index of the balanced schemes, comma-separated (2: identity scheme v1,
        /// 32: v2, what new fleets use).
        #[arg(long, value_delimiter = ',', default_value = "2,8,32")]
        candidates: Vec<u8>,
        /// Seed of the simulation's random numbers (the same seed, the same network).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write the chart (coverage against heads) to this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective values (passwords redacted).
    Check {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// Flags shared by the commands that build a configuration. Each flag may also come from its
/// `HYDRA_*` environment variable; a flag beats its variable, and both beat the file.
#[derive(Args, Clone)]
struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, env = "HYDRA_CONFIG")]
    config: Option<PathBuf>,
    /// Number of DHT heads.
    #[arg(long, env = "HYDRA_HEADS")]
    heads: Option<usize>,
    /// IP address the heads listen on.
    #[arg(long, env = "HYDRA_LISTEN_IP")]
    listen_ip: Option<String>,
    /// An IPv6 address the heads also listen on, e.g. :: (empty: off).
    #[arg(long, env = "HYDRA_LISTEN_IP6")]
    listen_ip6: Option<String>,
    /// Advertised address templates, comma-separated; {port} is the head's port, e.g.
    /// /dns4/node-a.example.org/tcp/{port}.
    #[arg(long, env = "HYDRA_ANNOUNCE", value_delimiter = ',')]
    announce: Option<Vec<String>>,
    /// Head i listens on port_base+i (TCP and QUIC); 0 = ephemeral.
    #[arg(long, env = "HYDRA_PORT_BASE")]
    port_base: Option<u16>,
    /// Directory of the embedded store.
    #[arg(long, env = "HYDRA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the HTTP server.
    #[arg(long, env = "HYDRA_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Address of a listener with only /metrics, /healthz and /readyz (empty: off).
    #[arg(long, env = "HYDRA_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Address of the public Delegated Routing V1 API, /routing/v1/… (empty: off).
    #[arg(long, env = "HYDRA_ROUTING_LISTEN")]
    routing_listen: Option<String>,
    /// Bootstrap peers (multiaddrs with /p2p/…), comma-separated.
    #[arg(long, env = "HYDRA_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Option<Vec<String>>,
    /// postgres://… for the fleet store; empty for the embedded store.
    #[arg(long, env = "HYDRA_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Log format.
    #[arg(long, env = "HYDRA_LOG_FORMAT", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// Also listen on QUIC (true or false).
    #[arg(long, env = "HYDRA_QUIC")]
    quic: Option<bool>,
    /// This process's name in the fleet (default: the host name).
    #[arg(long, env = "HYDRA_NODE_NAME")]
    node_name: Option<String>,
    /// File with the fleet's secret identity seed (64 hex characters).
    #[arg(long, env = "HYDRA_IDENTITY_SEED_FILE")]
    identity_seed_file: Option<String>,
    /// Which peer addresses may enter routing tables: public or any.
    #[arg(long, env = "HYDRA_ADDRESS_FILTER", value_parser = parse_filter)]
    address_filter: Option<AddressFilter>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

fn parse_filter(s: &str) -> Result<AddressFilter, String> {
    match s {
        "public" => Ok(AddressFilter::Public),
        "any" => Ok(AddressFilter::Any),
        _ => Err("expected public or any".into()),
    }
}

/// Exit codes (README "Command line"): 0 success; 1 the operation failed (datastore or node
/// unreachable, a query failed); 2 invalid command line, configuration or argument (e.g. a CID).
const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn load(args: &NodeArgs) -> Result<ConfigFile, String> {
    let mut file = match &args.config {
        Some(p) => ConfigFile::from_file(p).map_err(|e| e.to_string())?,
        None => ConfigFile::default(),
    };
    file.apply(Overrides {
        heads: args.heads,
        listen_ip: args.listen_ip.clone(),
        listen_ip6: args.listen_ip6.clone(),
        announce: args.announce.clone(),
        port_base: args.port_base,
        data_dir: args.data_dir.clone(),
        http_listen: args.http_listen.clone(),
        metrics_listen: args.metrics_listen.clone(),
        routing_listen: args.routing_listen.clone(),
        bootstrap: args.bootstrap.clone(),
        database_url: args.database_url.clone(),
        log_format: args.log_format,
        address_filter: args.address_filter,
        quic: args.quic,
        node_name: args.node_name.clone(),
        identity_seed_file: args.identity_seed_file.clone(),
    });
    Ok(file)
}

/// `RUST_LOG`, else INFO without libp2p's per-swarm peer-ID lines (each head logs its own with
/// its addresses); without bootstrap peers also without kad's "Failed to trigger bootstrap: No
/// known peers" warning per head at start — running without them is the documented default,
/// said once at INFO by the node.
fn init_tracing(format: LogFormat, no_bootstrap: bool) {
    let default = if no_bootstrap {
        "info,libp2p_swarm=warn,libp2p_kad::behaviour=error"
    } else {
        "info,libp2p_swarm=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A failed command: its message and exit code.
struct Failure(u8, String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(EXIT_FAILED, format!("{e:#}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match &cli.command {
        Command::Run(a) | Command::Migrate(a) => a,
        Command::Heads { node, .. }
        | Command::Providers { node, .. }
        | Command::Status { node, .. }
        | Command::Ready { node, .. } => node,
        Command::Config { command: ConfigCommand::Check { node, .. } } => node,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "hydra", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Sim {
            command: SimCommand::Coverage { peers, heads, keys, max_heads, candidates, seed, svg },
        } => {
            if *peers < 20 || *keys == 0 || heads.is_empty() {
                eprintln!("hydra sim coverage: --peers must be at least 20, --keys and --heads not empty");
                return ExitCode::from(EXIT_FAILED);
            }
            let report = hydra::sim::coverage(*peers, heads, *keys, *max_heads, candidates, *seed);
            print!("{}", report.table());
            if let Some(path) = svg {
                if let Err(e) = std::fs::write(path, report.svg()) {
                    eprintln!("hydra sim coverage: write {}: {e}", path.display());
                    return ExitCode::from(EXIT_FAILED);
                }
                println!("chart written to {}", path.display());
            }
            return ExitCode::SUCCESS;
        }
    };
    let file = match load(args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hydra: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cfg = match file.validate() {
        Ok(c) => hydra::Config { config_file: args.config.clone(), ..c },
        Err(e) => {
            eprintln!("hydra: invalid config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let workers = match cfg.worker_threads {
        0 => hydra::config::runtime_workers(std::thread::available_parallelism().map_or(1, |n| n.get())),
        n => n,
    };
    let rt = || {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b.enable_all().build().map_err(|e| {
            eprintln!("hydra: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
    };
    let res: Result<(), Failure> = match cli.command {
        Command::Config { command: ConfigCommand::Check { json, .. } } => {
            if json {
                println!("{}", file.to_redacted_json());
            } else {
                print!("{}", file.to_redacted_toml());
            }
            Ok(())
        }
        Command::Status { json, url, .. } => status(&cfg, url.as_deref(), json),
        Command::Ready { url, .. } => {
            http_get(&node_url(&cfg, url.as_deref()), "/readyz").map(|b| print!("{b}"))
        }
        Command::Providers { cid, json, limit, .. } => match hydra::keys::parse_provider_key(&cid) {
            Err(e) => Err(Failure(EXIT_CONFIG, format!("{cid:?} is not a CID or multihash: {e}"))),
            Ok(key) => match rt() {
                Ok(rt) => rt.block_on(providers(query_config(cfg), &cid, key, limit, json)),
                Err(code) => return code,
            },
        },
        Command::Heads { json, .. } => match rt() {
            Ok(rt) => rt.block_on(print_heads(query_config(cfg), json)),
            Err(code) => return code,
        },
        Command::Migrate(_) => {
            init_tracing(cfg.log_format, cfg.bootstrap.is_empty());
            match rt() {
                Ok(rt) => rt.block_on(async {
                    hydra::store::Store::migrate_only(&cfg.store, &cfg.postgres).await?;
                    tracing::info!("migrations applied");
                    Ok(())
                }),
                Err(code) => return code,
            }
        }
        Command::Run(_) => {
            init_tracing(cfg.log_format, cfg.bootstrap.is_empty());
            match rt() {
                Ok(rt) => rt.block_on(run(cfg)).map_err(|e| {
                    tracing::error!("{e:#}");
                    Failure::from(e)
                }),
                Err(code) => return code,
            }
        }
        Command::Completions { .. } | Command::Sim { .. } => unreachable!("handled above"),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("hydra: {msg}");
            ExitCode::from(code)
        }
    }
}

/// A configuration for a one-shot query: an unreachable database fails within seconds, not
/// after the node's start-up patience.
fn query_config(mut cfg: hydra::Config) -> hydra::Config {
    cfg.postgres.connect_timeout = cfg.postgres.connect_timeout.min(std::time::Duration::from_secs(3));
    cfg
}

/// Open the configured store for a query. An embedded store must exist already: a query must
/// not create an empty one in a mistyped `--data-dir` and report "nothing stored".
async fn open_for_query(cfg: &hydra::Config) -> Result<hydra::store::Store, Failure> {
    if let hydra::config::StoreKind::Sqlite(path) = &cfg.store {
        if !path.exists() {
            return Err(Failure(
                EXIT_FAILED,
                format!("no embedded store at {} (is --data-dir right?)", path.display()),
            ));
        }
    }
    let registry = prometheus::Registry::new();
    let metrics = hydra::metrics::Metrics::new(&registry, 0);
    Ok(hydra::store::Store::open(&cfg.store, &cfg.postgres, metrics.datastore).await?)
}

async fn providers(
    cfg: hydra::Config,
    query: &str,
    key: hydra::types::ProviderKey,
    limit: usize,
    json: bool,
) -> Result<(), Failure> {
    let store = open_for_query(&cfg).await?;
    let rows = store.inspect_providers(&key, limit.min(hydra::http::MAX_INSPECT)).await;
    store.close().await;
    let report = hydra::http::ProvidersReport::new(query, &key, rows?);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    // Records are keyed by multihash: say which key a CID of another codec or version reduced to.
    let key_text = if report.query == report.cid {
        format!("{} (multihash {})", report.cid, report.multihash)
    } else {
        format!("{} (multihash {}, as a raw CID {})", report.query, report.multihash, report.cid)
    };
    println!("{key_text}: {} provider record(s)", report.providers.len());
    if !report.providers.is_empty() {
        println!("{:<52}  {:<20}  addrs", "provider", "expires");
    }
    for p in &report.providers {
        println!("{:<52}  {:<20}  {}", p.peer_id, p.expires_at, p.addrs.join(" "));
    }
    Ok(())
}

/// GET `path` from a node's operator API at `base` (http://host:port); the body of a 200.
fn http_get(base: &str, path: &str) -> Result<String, Failure> {
    use std::io::{Read, Write};
    let hostport = base.trim_start_matches("http://").trim_end_matches('/');
    let unreachable = |e: std::io::Error| Failure(EXIT_FAILED, format!("node at {base} not reachable: {e}"));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| Failure(EXIT_CONFIG, format!("{base:?} names no address")))?;
    let timeout = std::time::Duration::from_secs(5);
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    sock.set_read_timeout(Some(timeout))?;
    write!(sock, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n")?;
    let mut resp = String::new();
    sock.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head.split(' ').nth(1).unwrap_or("?");
    if code != "200" {
        return Err(Failure(EXIT_FAILED, format!("{base}{path} answered {code}: {}", body.trim())));
    }
    Ok(body.to_string())
}

/// `--url`, else the configured `http_listen` (an unspecified address asked on loopback).
fn node_url(cfg: &hydra::Config, url: Option<&str>) -> String {
    match url {
        Some(u) => u.to_string(),
        None => {
            let mut a = cfg.http_listen;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{a}")
        }
    }
}

fn status(cfg: &hydra::Config, url: Option<&str>, json: bool) -> Result<(), Failure> {
    let body = http_get(&node_url(cfg, url), "/v1/status")?;
    if json {
        println!("{}", body.trim());
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let num = |v: &serde_json::Value| v.as_f64().map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    println!(
        "tier {}{} for {:.0} s; {} heads; fleet processes {}",
        v["tier"].as_str().unwrap_or("?"),
        if v["forced"].as_bool() == Some(true) { " (forced)" } else { "" },
        v["tier_age_seconds"].as_f64().unwrap_or(0.0),
        v["heads"],
        v["fleet_processes"],
    );
    let connections = match (v["shedding_connections"].as_bool(), v.get("admission_connections_per_second")) {
        (Some(true), _) => "shedding".to_string(),
        (_, Some(r)) => format!("{r}/s"),
        (_, None) => "open".into(),
    };
    let connections = if v["listeners_closed"].as_bool() == Some(true) {
        format!("{connections} (TCP listeners closed)")
    } else {
        connections
    };
    println!(
        "records ≈ {:.0}, peers ≈ {:.0}; write buffer {}/{}; statement budget {}/s; admission {}; connections {}",
        v["records_estimate"].as_f64().unwrap_or(0.0),
        v["peers_estimate"].as_f64().unwrap_or(0.0),
        v["write_buffer_entries"],
        v["write_buffer_capacity"],
        v["statement_budget_per_second"],
        v.get("admission_streams_per_second")
            .map(|r| format!("{r} streams/s"))
            .unwrap_or_else(|| "open".into()),
        connections,
    );
    println!("{:<26} {:>10} {:>10} {:>10} {:>10}", "signal", "value", "degrade", "refuse", "peak");
    if let Some(signals) = v["signals"].as_object() {
        for (name, value) in signals {
            println!(
                "{:<26} {:>10} {:>10} {:>10} {:>10}",
                name,
                num(value),
                num(&v["load"]["degrade"][name]),
                num(&v["load"]["refuse"][name]),
                num(&v["load"]["peak"][name]),
            );
        }
    }
    Ok(())
}

/// Raise the soft open-file limit to the hard limit (each head holds several sockets per
/// connection) and warn if it still looks too low for the configured heads.
fn raise_fd_limit(heads: usize) {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim = raised;
                }
            }
            let wanted = (heads as u64).saturating_mul(64);
            if lim.rlim_cur < wanted {
                tracing::warn!(limit = lim.rlim_cur, wanted, "open-file limit is low for this many heads");
            }
        }
    }
}

async fn run(cfg: hydra::Config) -> anyhow::Result<()> {
    raise_fd_limit(cfg.heads);
    // Signal handlers first: a SIGHUP or SIGTERM sent as soon as the node says it started must
    // find them installed (the default action of both is to kill the process).
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let stop = shutdown_signal()?;
    tokio::pin!(stop);
    let node = tokio::select! {
        node = hydra::Node::start(cfg) => node?,
        _ = &mut stop => {
            tracing::info!("stop signal during start-up; exiting");
            return Ok(());
        }
    };
    loop {
        #[cfg(unix)]
        tokio::select! {
            _ = &mut stop => break,
            _ = hup.recv() => {
                // Errors are logged and counted by the reloader; the old settings stay.
                let _ = node.reload_load_config();
            }
        }
        #[cfg(not(unix))]
        {
            (&mut stop).await;
            break;
        }
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn print_heads(cfg: hydra::Config, json: bool) -> Result<(), Failure> {
    let store = open_for_query(&cfg).await?;
    let heads = store.list_heads().await;
    store.close().await;
    let heads = heads?;
    if json {
        println!("{}", serde_json::to_string_pretty(&heads)?);
        return Ok(());
    }
    println!("{:>8}  {:<20} {:>5}  {:<8} {:<52}  addrs", "identity", "node", "slot", "lease", "peer id");
    for h in &heads {
        println!(
            "{:>8}  {:<20} {:>5}  {:<8} {:<52}  {}",
            h.identity,
            h.node.as_deref().unwrap_or("-"),
            h.slot.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            if h.lease_active {
                "active"
            } else if h.node.is_some() {
                "expired"
            } else {
                "free"
            },
            h.peer_id,
            h.addrs.join(" ")
        );
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed by this call, not on first poll.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
