//! A real PostgreSQL for tests: `DATABASE_URL` when set (it must allow CREATE DATABASE),
//! otherwise one throwaway cluster per test binary, started on first use and stopped at exit.
//! Every test gets a database of its own.

use std::sync::{Mutex, OnceLock};

use hydra_testkit::{create_database, PgCluster};

static ADMIN_URL: OnceLock<Result<String, String>> = OnceLock::new();
static CLUSTER: Mutex<Option<PgCluster>> = Mutex::new(None);

extern "C" fn stop_cluster() {
    if let Ok(mut c) = CLUSTER.lock() {
        c.take(); // Drop stops the server and removes its files.
    }
}

/// URL of a database on the test server with the right to create databases.
pub fn admin_url() -> String {
    ADMIN_URL
        .get_or_init(|| {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return Ok(url);
            }
            let c = PgCluster::start(false).map_err(|e| format!("{e:#}"))?;
            let url = c.url("postgres");
            *CLUSTER.lock().unwrap() = Some(c);
            // SAFETY: registering a plain extern "C" fn; it runs once at process exit.
            unsafe { libc::atexit(stop_cluster) };
            Ok(url)
        })
        .clone()
        .unwrap_or_else(|e| panic!("no PostgreSQL for tests: {e}"))
}

/// A new empty database; returns its URL.
pub async fn fresh_database() -> String {
    let name = format!("hydra_t_{:016x}", rand::random::<u64>());
    create_database(&admin_url(), &name).await.expect("create test database")
}

/// A plain client on `url`, for assertions.
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}
