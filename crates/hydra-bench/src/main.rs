//! `hydra-bench`: the benchmarks of `docs/benchmarks.md`, a binary of its own so the node's
//! binary carries none of their code. Run with `cargo run --release -p hydra-bench -- <command>`;
//! the commands that start a node (`load`, `startup`) first build the `hydra` binary of this
//! checkout with the same profile (or use `HYDRA_BIN`).

mod compare;
mod cpu_quota;
mod findnode;
mod idle;
mod load;
mod node;
mod routing;
mod sampling;
mod startup;
mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hydra-bench", version, about = "Benchmarks of the hydra node (see docs/benchmarks.md)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Provider manager vs the raw PostgreSQL ceiling (writes and reads), side by side.
    Store {
        /// Server to use (must allow CREATE DATABASE); default: a throwaway local cluster.
        #[arg(long, env = "HYDRA_BENCH_DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, default_value_t = 400_000)]
        preload: usize,
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        #[arg(long, default_value_t = 50_000)]
        lookups: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Start-up time and idle memory of `hydra run` with many heads (embedded store).
    Startup {
        /// Head counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,100,500,1000")]
        heads: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds to stay idle before reading the resident memory.
        #[arg(long, default_value_t = 5)]
        idle: u64,
        /// Run the heads with QUIC listeners too.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        quic: bool,
        /// Synthetic DHT servers to identify to the heads before the idle wait (they fill the
        /// process-wide routing table; issue 13 measures RSS with 20,000).
        #[arg(long, default_value_t = 0)]
        peers: usize,
        /// Head i listens on port_base + i, as in a deployment (`port_base` in the node's config);
        /// 0: ephemeral ports, whose search in the kernel grows with the ports in use (bind(0)
        /// with 10,000 listeners open; docs/benchmarks.md). Default: the first block of free
        /// ports from 10,000 up, below the ephemeral range.
        #[arg(long)]
        port_base: Option<u16>,
    },
    /// Open-loop load against a `hydra run` process on PostgreSQL: capacity, then multiples of it.
    Load {
        /// Server to use (must allow CREATE DATABASE); default: a throwaway local cluster.
        #[arg(long, env = "HYDRA_BENCH_DATABASE_URL")]
        database_url: Option<String>,
        /// Node config to start from (e.g. its [load] section); listen and store settings are set
        /// by the benchmark.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Client identities (each its own libp2p connection to every head).
        #[arg(long, default_value_t = 200)]
        clients: usize,
        /// Request mix: percentages of ADD_PROVIDER, GET_PROVIDERS, FIND_NODE.
        #[arg(long, value_delimiter = ',', default_value = "30,50,20")]
        mix: Vec<u32>,
        /// Offered rates (requests/s) to run; when absent, capacity C is searched first.
        #[arg(long, value_delimiter = ',')]
        rates: Vec<f64>,
        /// Use this capacity C (requests/s) instead of searching it.
        #[arg(long)]
        capacity: Option<f64>,
        /// Multiples of C to run after the search.
        #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,5,10")]
        multiples: Vec<f64>,
        /// First rate of the capacity search (requests/s).
        #[arg(long, default_value_t = 250.0)]
        start_rate: f64,
        #[arg(long, default_value_t = 10)]
        search_seconds: u64,
        #[arg(long, default_value_t = 30)]
        step_seconds: u64,
        /// The latency target that defines capacity: p99 of answered GET_PROVIDERS.
        #[arg(long, default_value_t = 50)]
        p99_target_ms: u64,
        /// Provider records announced before measuring.
        #[arg(long, default_value_t = 20_000)]
        preload: usize,
        /// Slow PostgreSQL down: hold an exclusive lock on the provider table for this many ms…
        #[arg(long)]
        slow_hold_ms: Option<u64>,
        /// …out of every this many ms.
        #[arg(long, default_value_t = 1000)]
        slow_period_ms: u64,
        #[arg(long, default_value_t = 5000)]
        request_timeout_ms: u64,
        /// Requests the generator keeps in flight at most (beyond: counted as generator drops).
        #[arg(long, default_value_t = 50_000)]
        max_in_flight: usize,
        /// Confine the node to this share of one core (cgroup CPU quota, 10 ms period; needs
        /// root), e.g. 0.2, so the generator and PostgreSQL have the cores the node lacks.
        #[arg(long)]
        node_cpu_quota: Option<f64>,
        /// The node's runtime worker threads (its `worker_threads`). Default: with a quota, what
        /// a node started inside it picks (one per whole core of the quota, at least two) — the
        /// bench moves the node into its group only after the preload, so it would otherwise
        /// size its runtime from the machine; without a quota, the node's own default.
        #[arg(long)]
        node_workers: Option<usize>,
        /// After the ×1.5 capacity search, this many bisections between the last rate met and
        /// the first missed (each a search step); 0: C is the last ×1.5 step met.
        #[arg(long, default_value_t = 2)]
        search_refine: u32,
        /// Run every step clean and then beside this many silent/slow peers (streams that never
        /// write, stop mid-message, or never read), and compare the goodput.
        #[arg(long, default_value_t = 0)]
        silent_peers: usize,
        /// Misbehaving streams each silent peer holds per head.
        #[arg(long, default_value_t = 6)]
        silent_streams: usize,
    },
    /// Idle streams: memory per idle stream, and a fresh client's FIND_NODEs beside them.
    IdleStreams {
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Client identities, each from its own loopback source address.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Idle streams each client holds on every head (the node allows 64 per peer and head).
        #[arg(long, default_value_t = 64)]
        streams_per_head: usize,
        /// FIND_NODEs the fresh client sends afterwards.
        #[arg(long, default_value_t = 1000)]
        probes: usize,
    },
    /// Fair provider sampling on PostgreSQL: what the sample-key index costs writes, and the
    /// window read against the previous unordered read and ORDER BY random().
    Sampling {
        #[arg(long, env = "HYDRA_BENCH_DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        #[arg(long, default_value_t = 10_000)]
        popular: usize,
        #[arg(long, default_value_t = 200_000)]
        writes: usize,
        #[arg(long, default_value_t = 2000)]
        lookups: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// (Used by `startup --peers`.) Synthetic DHT servers: identify `count` fresh identities to
    /// the heads of the node whose HTTP API is at `http`, starting with head `offset` (in turn),
    /// print "identified", then keep them up until killed.
    #[command(hide = true)]
    SyntheticServers {
        #[arg(long)]
        http: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// Node CPU per FIND_NODE over the wire as heads grow (idle CPU taken out), with the table
    /// full and clients on a few heads, alternating head counts (and builds) in rounds.
    FindNode {
        #[arg(long, value_delimiter = ',', default_value = "4,10000")]
        heads: Vec<usize>,
        /// Synthetic DHT servers identified to the heads first (issue 13 measures with 20,000).
        #[arg(long, default_value_t = 20_000)]
        peers: usize,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Heads the clients connect to (the first ones).
        #[arg(long, default_value_t = 4)]
        client_heads: usize,
        /// FIND_NODE per second, each on a fresh stream.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Seconds of idle CPU read before the load (clients connected).
        #[arg(long, default_value_t = 10)]
        idle: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Another `hydra` binary to measure alternately with this checkout's…
        #[arg(long)]
        baseline_bin: Option<std::path::PathBuf>,
        /// …and its label (e.g. the commit it was built from).
        #[arg(long, default_value = "baseline")]
        baseline_label: String,
    },
    /// Closer peers as heads grow: a head's answer from its snapshot (routing table plus every
    /// sibling head), the trie walk against a full scan of the same candidates.
    Routing {
        #[arg(long, value_delimiter = ',', default_value = "4,100,1000,10000")]
        heads: Vec<usize>,
        /// Peers in the head's routing table (issue 13 measures with 20,000).
        #[arg(long, default_value_t = 20_000)]
        peers: usize,
        #[arg(long, default_value_t = 2_000)]
        queries: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Side by side: hydra (embedded, PostgreSQL), stock rust-libp2p kad and js-libp2p kad-dht
    /// under one workload, alternated A B C D A B C D (docs/benchmarks.md "Side by side").
    Compare {
        /// Servers, in the order they alternate: hydra, hydra-1w (embedded, `worker_threads = 1`),
        /// hydra-pg, rust-kad, js; also hydra-base (embedded, `--baseline-bin`).
        #[arg(long, value_delimiter = ',', default_value = "hydra,hydra-1w,hydra-pg,rust-kad,js")]
        servers: Vec<String>,
        /// Heads (nodes) per server process: scale points.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        heads: Vec<usize>,
        /// Provider records each server holds before measuring: scale points.
        #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
        records: Vec<u64>,
        /// Client identities, each from its own loopback address and connected to every head.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Request mix: percentages of ADD_PROVIDER, GET_PROVIDERS, FIND_NODE.
        #[arg(long, value_delimiter = ',', default_value = "30,50,20")]
        mix: Vec<u32>,
        /// Offered rate (requests/s, open loop), the same for every server.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value_t = 15)]
        step_seconds: u64,
        /// Rounds of A B C D (with --overload: rounds of each server's multiples; medians reported).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Stream modes: fresh (a stream per request), reused (streams kept per client and head).
        #[arg(long, value_delimiter = ',', default_value = "fresh,reused")]
        streams: Vec<String>,
        /// Overload curves instead: each server alone under `--node-cpu-quota`, 0.5C … 10C of its
        /// own capacity (first of --heads and --records).
        #[arg(long)]
        overload: bool,
        /// Share of one core each server gets in `--overload` (cgroup CPU quota, 10 ms period).
        #[arg(long)]
        node_cpu_quota: Option<f64>,
        #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,5,10")]
        multiples: Vec<f64>,
        #[arg(long, default_value_t = 100.0)]
        start_rate: f64,
        #[arg(long, default_value_t = 10)]
        search_seconds: u64,
        /// The latency target that defines capacity: p99 of answered GET_PROVIDERS.
        #[arg(long, default_value_t = 50)]
        p99_target_ms: u64,
        /// Write the overload chart (SVG) here.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
        /// The `hydra` binary the `hydra-base` server runs (e.g. one built from an earlier
        /// commit): a change measured side by side against what it changes.
        #[arg(long)]
        baseline_bin: Option<std::path::PathBuf>,
    },
    /// The reference stock rust-libp2p kad server `compare` runs (not hydra; see its source).
    #[command(hide = true)]
    StockRustKad {
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long, default_value_t = 0)]
        records: u64,
    },
    /// Garbage collection: its rate, alone and under writes, and its cost to concurrent writes.
    Gc {
        #[arg(long, env = "HYDRA_BENCH_DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 200_000)]
        writes: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_swarm=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let res = match &cli.command {
        Command::Store { database_url, preload, rows, lookups, runs } => {
            rt.block_on(store::store(store::StoreBenchOpts {
                database_url: database_url.clone(),
                preload: *preload,
                rows: *rows,
                lookups: *lookups,
                runs: (*runs).max(1),
            }))
        }
        Command::Startup { heads, runs, idle, quic, peers, port_base } => rt.block_on(startup::startup(
            heads.clone(),
            (*runs).max(1),
            std::time::Duration::from_secs(*idle),
            *quic,
            *peers,
            *port_base,
        )),
        Command::Load {
            database_url,
            config,
            heads,
            clients,
            mix,
            rates,
            capacity,
            multiples,
            start_rate,
            search_seconds,
            step_seconds,
            p99_target_ms,
            preload,
            slow_hold_ms,
            slow_period_ms,
            request_timeout_ms,
            max_in_flight,
            node_cpu_quota,
            node_workers,
            search_refine,
            silent_peers,
            silent_streams,
        } => {
            let ms = std::time::Duration::from_millis;
            let secs = std::time::Duration::from_secs;
            match <[u32; 3]>::try_from(mix.as_slice()) {
                Err(_) => Err(anyhow::anyhow!("--mix takes three numbers: add,get,find")),
                Ok(mix) => rt.block_on(load::load(load::LoadBenchOpts {
                    database_url: database_url.clone(),
                    config: config.clone(),
                    heads: (*heads).max(1),
                    clients: (*clients).max(1),
                    mix,
                    rates: rates.clone(),
                    capacity: *capacity,
                    multiples: multiples.clone(),
                    start_rate: *start_rate,
                    search_step: secs(*search_seconds),
                    step: secs(*step_seconds),
                    p99_target: ms(*p99_target_ms),
                    preload: *preload,
                    slow_postgres: slow_hold_ms.map(|h| (ms(h), ms(*slow_period_ms))),
                    request_timeout: ms(*request_timeout_ms),
                    max_in_flight: *max_in_flight,
                    node_cpu_quota: *node_cpu_quota,
                    node_workers: *node_workers,
                    search_refine: *search_refine,
                    silent_peers: *silent_peers,
                    silent_streams: *silent_streams,
                })),
            }
        }
        Command::IdleStreams { heads, clients, streams_per_head, probes } => {
            rt.block_on(idle::idle_streams(idle::IdleOpts {
                heads: (*heads).max(1),
                clients: (*clients).max(1),
                streams_per_head: *streams_per_head,
                probes: *probes,
            }))
        }
        Command::SyntheticServers { http, count, offset } => {
            rt.block_on(startup::synthetic_servers(http.clone(), *count, *offset))
        }
        Command::FindNode {
            heads,
            peers,
            clients,
            client_heads,
            rate,
            seconds,
            idle,
            rounds,
            baseline_bin,
            baseline_label,
        } => rt.block_on(findnode::find_node(findnode::FindNodeOpts {
            heads: heads.clone(),
            peers: *peers,
            clients: (*clients).max(1),
            client_heads: *client_heads,
            rate: *rate,
            seconds: (*seconds).max(1),
            idle: (*idle).max(1),
            rounds: (*rounds).max(1),
            baseline: baseline_bin.clone().map(|b| (baseline_label.clone(), b)),
        })),
        Command::Routing { heads, peers, queries, runs } => routing::routing(routing::RoutingOpts {
            heads: heads.clone(),
            peers: *peers,
            queries: (*queries).max(1),
            runs: (*runs).max(1),
        }),
        Command::Sampling { database_url, keys, popular, writes, lookups, runs } => {
            rt.block_on(sampling::sampling(sampling::SamplingOpts {
                database_url: database_url.clone(),
                keys: *keys,
                popular: *popular,
                writes: *writes,
                lookups: *lookups,
                runs: (*runs).max(1),
            }))
        }
        Command::Compare {
            servers,
            heads,
            records,
            clients,
            mix,
            rate,
            step_seconds,
            rounds,
            streams,
            overload,
            node_cpu_quota,
            multiples,
            start_rate,
            search_seconds,
            p99_target_ms,
            svg,
            baseline_bin,
        } => (|| {
            let mix = <[u32; 3]>::try_from(mix.as_slice())
                .map_err(|_| anyhow::anyhow!("--mix takes three numbers: add,get,find"))?;
            let servers = servers.iter().map(|s| compare::Kind::parse(s)).collect::<anyhow::Result<_>>()?;
            let reuse = streams
                .iter()
                .map(|s| match s.as_str() {
                    "fresh" => Ok(false),
                    "reused" => Ok(true),
                    _ => Err(anyhow::anyhow!("--streams takes fresh and/or reused, got {s:?}")),
                })
                .collect::<anyhow::Result<_>>()?;
            let secs = std::time::Duration::from_secs;
            rt.block_on(compare::compare(compare::CompareOpts {
                servers,
                heads: heads.iter().map(|h| (*h).max(1)).collect(),
                records: records.clone(),
                clients: (*clients).max(1),
                mix,
                rate: *rate,
                step: secs(*step_seconds),
                rounds: (*rounds).max(1),
                reuse,
                overload: *overload,
                node_cpu_quota: *node_cpu_quota,
                multiples: multiples.clone(),
                start_rate: *start_rate,
                search_step: secs(*search_seconds),
                p99_target: std::time::Duration::from_millis(*p99_target_ms),
                svg: svg.clone(),
                baseline_bin: baseline_bin.clone(),
            }))
        })(),
        Command::StockRustKad { nodes, records } => {
            rt.block_on(compare::stock_kad::serve((*nodes).max(1), *records))
        }
        Command::Gc { database_url, rows, writes, runs } => rt.block_on(store::gc(store::GcBenchOpts {
            database_url: database_url.clone(),
            rows: *rows,
            writes: *writes,
            runs: (*runs).max(1),
        })),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hydra-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
