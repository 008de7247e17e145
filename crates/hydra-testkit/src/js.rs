//! The pinned js-libp2p packages of `tests/js` (interop peers, Helia's routing client, the
//! `ipns` package, and the js-libp2p reference server of `hydra-bench compare`).

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{ensure, Context as _};

static NPM: Mutex<()> = Mutex::new(());

/// `tests/js` of this checkout.
pub fn js_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/js"))
}

/// Install the pinned packages (`npm ci`) unless they are there (serialised within a process).
pub fn ensure_js_deps() -> anyhow::Result<()> {
    let _guard = NPM.lock().unwrap_or_else(|e| e.into_inner());
    let installed = ["@libp2p/kad-dht", "ipns", "@helia/delegated-routing-v1-http-api-client"]
        .iter()
        .all(|p| js_dir().join("node_modules").join(p).exists());
    if installed {
        return Ok(());
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(js_dir())
        .status()
        .context("run npm (Node.js and npm must be installed)")?;
    ensure!(status.success(), "npm ci in {} failed", js_dir().display());
    Ok(())
}
