//! The `hydra` binary: parse the command line, build the configuration, start tracing, and run
//! the node until SIGINT or SIGTERM. Everything else lives in the library; the benchmarks are a
//! separate binary (`cargo run --release -p hydra-bench -- …`, in `crates/hydra-bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
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
    Heads(NodeArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective values (passwords redacted).
    Check(NodeArgs),
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
    /// Head i listens on port_base+i (TCP and QUIC); 0 = ephemeral.
    #[arg(long, env = "HYDRA_PORT_BASE")]
    port_base: Option<u16>,
    /// Directory of the embedded store.
    #[arg(long, env = "HYDRA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the HTTP server.
    #[arg(long, env = "HYDRA_HTTP_LISTEN")]
    http_listen: Option<String>,
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

#[derive(PartialEq, Eq)]
enum Mode {
    Run,
    Migrate,
    Heads,
    Check,
}

/// Exit code for configuration errors (as for command-line usage errors).
const EXIT_CONFIG: u8 = 2;

fn load(args: &NodeArgs) -> Result<ConfigFile, String> {
    let mut file = match &args.config {
        Some(p) => ConfigFile::from_file(p).map_err(|e| e.to_string())?,
        None => ConfigFile::default(),
    };
    file.apply(Overrides {
        heads: args.heads,
        listen_ip: args.listen_ip.clone(),
        port_base: args.port_base,
        data_dir: args.data_dir.clone(),
        http_listen: args.http_listen.clone(),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, mode) = match &cli.command {
        Command::Run(a) => (a.clone(), Mode::Run),
        Command::Migrate(a) => (a.clone(), Mode::Migrate),
        Command::Heads(a) => (a.clone(), Mode::Heads),
        Command::Config { command: ConfigCommand::Check(a) } => (a.clone(), Mode::Check),
    };
    let file = match load(&args) {
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
    if mode == Mode::Check {
        print!("{}", file.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing(cfg.log_format, cfg.bootstrap.is_empty());
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hydra: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = match mode {
        Mode::Migrate => rt.block_on(async {
            hydra::store::Store::migrate_only(&cfg.store, &cfg.postgres).await?;
            tracing::info!("migrations applied");
            Ok(())
        }),
        Mode::Heads => rt.block_on(print_heads(cfg)),
        _ => rt.block_on(run(cfg)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hydra: {e:#}");
            ExitCode::FAILURE
        }
    }
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

async fn print_heads(cfg: hydra::Config) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let metrics = hydra::metrics::Metrics::new(&registry, 0);
    let store = hydra::store::Store::open(&cfg.store, &cfg.postgres, metrics.datastore).await?;
    let heads = store.list_heads().await?;
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
    store.close().await;
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
