//! Rolling upgrades on one PostgreSQL: the previous release (built here from git) keeps serving
//! while this version migrates the schema under it, and records written by either are served by
//! both; and this version starts on a schema that a newer version has already migrated.
//!
//! The previous release is [`PREVIOUS`]: the last commit before migration 0004. It is built from
//! this repository's history into the test's target directory on first use (a full debug build,
//! a few minutes); `HYDRA_PREV_BIN` names an already built binary instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{pg, Process, RawClient, WAIT};
use hydra::net::wire::{self, MessageType, PbMessage, PbRecord};
use prost::Message as _;

/// The previous release: the last commit whose schema ends at migration 0003.
const PREVIOUS: &str = "42ce22c9e9226418183935d27abb5cb5c3b148a0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The previous release's `hydra` binary, built once.
fn previous_binary() -> PathBuf {
    if let Ok(p) = std::env::var("HYDRA_PREV_BIN") {
        return p.into();
    }
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("previous-release");
    let bin = base.join("target/debug/hydra");
    let stamp = base.join("built-from");
    if bin.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(PREVIOUS) {
        return bin;
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    let has = Command::new("git")
        .args(["cat-file", "-e", &format!("{PREVIOUS}^{{commit}}")])
        .current_dir(repo())
        .status();
    assert!(
        has.is_ok_and(|s| s.success()),
        "the previous release {PREVIOUS} is not in this clone's history (a shallow clone?); \
         set HYDRA_PREV_BIN to a hydra binary built from it"
    );
    let tar = src.join("release.tar");
    let archive = Command::new("git")
        .args(["archive", "--format=tar", "-o"])
        .arg(&tar)
        .arg(PREVIOUS)
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(archive.success(), "git archive {PREVIOUS}");
    let untar = Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&src).status().unwrap();
    assert!(untar.success(), "unpack {PREVIOUS}");
    println!("building the previous release {PREVIOUS} (once)…");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--locked", "-p", "hydra", "--bin", "hydra"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", base.join("target"))
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "build the previous release");
    std::fs::write(&stamp, PREVIOUS).unwrap();
    bin
}

fn run_args<'a>(db: &'a str, name: &'a str, data: &'a str, seed: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--heads",
        "2",
        "--listen-ip",
        "127.0.0.1",
        "--http-listen",
        "127.0.0.1:0",
        "--address-filter",
        "any",
        "--database-url",
        db,
        "--node-name",
        name,
        "--data-dir",
        data,
        "--identity-seed-file",
        seed,
    ]
}

fn random_key() -> Vec<u8> {
    let mut k = vec![0x12, 0x20];
    k.extend((0..32).map(|_| rand::random::<u8>()));
    k
}

async fn providers_of(client: &RawClient, head: libp2p::PeerId, key: &[u8]) -> Vec<Vec<u8>> {
    client.get_providers(head, key).await.provider_peers.into_iter().map(|p| p.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_keeps_serving_while_this_one_migrates_under_it() {
    // .ci/run sets this, loudly, only when its checkout has no history to build the release from.
    if std::env::var("HYDRA_SKIP_UPGRADE_TEST").is_ok() {
        eprintln!("SKIPPED: HYDRA_SKIP_UPGRADE_TEST is set");
        return;
    }
    let prev = tokio::task::spawn_blocking(previous_binary).await.unwrap();
    let db = pg::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed");
    std::fs::write(&seed, hex::encode(rand::random::<[u8; 32]>())).unwrap();
    let (d_old, d_new) = (dir.path().join("old"), dir.path().join("new"));
    let (seed, d_old, d_new) = (seed.to_str().unwrap(), d_old.to_str().unwrap(), d_new.to_str().unwrap());

    let old = Process::launch_bin(&prev, &run_args(&db, "old", d_old, seed), &[]).started();
    let pgc = pg::client(&db).await;
    let version = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i64>(0);
    let before = version(pgc.query("SELECT max(version) FROM _sqlx_migrations", &[]).await.unwrap());
    assert_eq!(before, 3, "the previous release's schema");
    let new = Process::spawn(&run_args(&db, "new", d_new, seed), &[]);
    let after = version(pgc.query("SELECT max(version) FROM _sqlx_migrations", &[]).await.unwrap());
    assert!(after > before, "this version migrated the shared schema ({before} → {after})");

    // Records announced to either version are served by both.
    let (old_heads, new_heads) = (old.heads(), new.heads());
    let client = RawClient::connect(&[old_heads.clone(), new_heads.clone()].concat()).await;
    let (k_old, k_new) = (random_key(), random_key());
    let mut s = client.open(old_heads[0].0).await;
    RawClient::send(&mut s, &client.add_provider_body(&k_old)).await.unwrap();
    let mut s = client.open(new_heads[0].0).await;
    RawClient::send(&mut s, &client.add_provider_body(&k_new)).await.unwrap();
    let me = client.peer_id.to_bytes();
    let start = Instant::now();
    loop {
        // Each answer is looked up on the other version's heads (through the datastore, once
        // flushed: 1 s; an empty answer is cached 5 s, so the loop may take a few rounds).
        let a = providers_of(&client, new_heads[1].0, &k_old).await;
        let b = providers_of(&client, old_heads[1].0, &k_new).await;
        if a.contains(&me) && b.contains(&me) {
            break;
        }
        assert!(start.elapsed() < WAIT, "old→new {a:?}, new→old {b:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The previous release's value upsert still works on the migrated table, and this version
    // reads what it wrote.
    let kp = libp2p::identity::Keypair::generate_ed25519();
    let key = [b"/pk/".as_slice(), &kp.public().to_peer_id().to_bytes()].concat();
    let put = PbMessage {
        r#type: MessageType::PutValue as i32,
        key: key.clone(),
        record: Some(PbRecord {
            key: key.clone(),
            value: kp.public().encode_protobuf(),
            time_received: String::new(),
        }),
        ..Default::default()
    }
    .encode_to_vec();
    assert!(client.try_request(old_heads[0].0, &put).await.is_some(), "PUT_VALUE on the previous release");
    let get = wire::encode_request(MessageType::GetValue, &key, &[]);
    let got = client.try_request(new_heads[0].0, &get).await.and_then(|m| m.record).map(|r| r.value);
    assert_eq!(got, Some(kp.public().encode_protobuf()));

    assert!(old.stop(), "the previous release shuts down cleanly");
    assert!(new.stop());
}

/// A newer version's migration already applied (an unknown version in `_sqlx_migrations`):
/// this version still starts and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_version_starts_on_a_schema_a_newer_version_migrated() {
    let db = pg::fresh_database().await;
    hydra::store::Store::migrate_only(&hydra::config::StoreKind::Postgres(db.clone()), &Default::default())
        .await
        .unwrap();
    let pgc = pg::client(&db).await;
    pgc.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'a future version', true, '\\x00'::bytea, 0)",
        &[],
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path(), 1);
    cfg.store = hydra::config::StoreKind::Postgres(db);
    let node = hydra::Node::start(cfg).await.expect("starts on a newer schema");
    node.shutdown().await;
}
