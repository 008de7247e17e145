//! The deploy files, each checked by a real tool from the registries (pinned below, installed
//! with pip into the test's target directory on first use): the Kubernetes manifests against the
//! schemas `kubernetes-validate` bundles, the compose file against the Compose specification
//! (`check-jsonschema`'s vendored copy), the Dockerfile's structure (`dockerfile-parse`), the
//! systemd unit with `systemd-analyze verify`, the Prometheus configs with `promtool`, and every
//! hydra configuration they carry with `hydra config check`. The image build itself is not run
//! (no Docker engine on this machine kind).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

static PIP: Mutex<()> = Mutex::new(());

const PY_TOOLS: &[&str] =
    &["kubernetes-validate==1.37.0", "check-jsonschema==0.39.0", "dockerfile-parse==2.0.1"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pinned Python tools, installed once into the target directory.
fn py_tools() -> PathBuf {
    let _guard = PIP.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-pytools");
    let stamp = dir.join(".installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(&PY_TOOLS.join(" ")) {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
            .arg(&dir)
            .args(PY_TOOLS)
            .status()
            .expect("python3 with pip is installed (the deploy checks need it)");
        assert!(status.success(), "pip install {PY_TOOLS:?} failed");
        std::fs::write(&stamp, PY_TOOLS.join(" ")).unwrap();
    }
    dir
}

/// Run a Python tool's console script from [`py_tools`]; returns (success, stdout + stderr).
fn py(tool: &str, args: &[&str]) -> (bool, String) {
    let dir = py_tools();
    let out = Command::new("python3")
        .arg(dir.join("bin").join(tool))
        .args(args)
        .env("PYTHONPATH", &dir)
        .current_dir(repo())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn hydra_check(envs: &[(&str, &str)], config: Option<&Path>) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hydra"));
    c.args(["config", "check"]);
    if let Some(p) = config {
        c.arg("--config").arg(p);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("HYDRA_") {
            c.env_remove(k);
        }
    }
    let out = c.envs(envs.iter().copied()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn kubernetes_manifests_match_the_api_schemas_and_carry_a_valid_config() {
    let files: Vec<String> = ["secret.yaml", "configmap.yaml", "statefulset.yaml", "services.yaml"]
        .iter()
        .map(|f| format!("deploy/k8s/{f}"))
        .collect();
    let mut args = vec!["--strict", "--kubernetes-version", "1.30.0"];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = py("kubernetes-validate", &args);
    assert!(ok, "{out}");
    assert_eq!(out.matches(" passed for resource ").count(), 7, "every document checked: {out}");
    // A broken manifest is caught (the check can fail).
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(repo().join("deploy/k8s/statefulset.yaml")).unwrap();
    std::fs::write(&bad, text.replace("containerPort: 4001", "containerPort: \"four\"")).unwrap();
    let (ok, out) =
        py("kubernetes-validate", &["--strict", "--kubernetes-version", "1.30.0", bad.to_str().unwrap()]);
    assert!(!ok, "a string port must fail: {out}");

    // The config map's hydra.toml is a valid configuration (its database URL comes from the
    // secret; a placeholder stands in for it here).
    let cm = std::fs::read_to_string(repo().join("deploy/k8s/configmap.yaml")).unwrap();
    let toml: String = cm
        .split("hydra.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let file = dir.path().join("hydra.toml");
    std::fs::write(&file, toml).unwrap();
    let (ok, err) = hydra_check(
        &[
            ("HYDRA_DATABASE_URL", "postgres://hydra:x@db/hydra"),
            ("HYDRA_NODE_NAME", "hydra-0"),
            (
                "HYDRA_ANNOUNCE",
                "/dns4/hydra-0.dht.example.org/tcp/{port},/dns4/hydra-0.dht.example.org/udp/{port}/quic-v1",
            ),
        ],
        Some(&file),
    );
    assert!(ok, "{err}");
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let (ok, out) = py(
        "check-jsonschema",
        &["--builtin-schema", "vendor.compose-spec", "deploy/compose/docker-compose.yml"],
    );
    assert!(ok, "{out}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("docker-compose.yml");
    let text = std::fs::read_to_string(repo().join("deploy/compose/docker-compose.yml")).unwrap();
    std::fs::write(&bad, text.replace("restart: unless-stopped", "restart: [sometimes]")).unwrap();
    let (ok, out) =
        py("check-jsonschema", &["--builtin-schema", "vendor.compose-spec", bad.to_str().unwrap()]);
    assert!(!ok, "a bad restart policy must fail: {out}");
    // The nodes' environment is a valid hydra configuration.
    let (ok, err) = hydra_check(
        &[
            ("HYDRA_HEADS", "4"),
            ("HYDRA_PORT_BASE", "4001"),
            ("HYDRA_DATABASE_URL", "postgres://hydra:hydra@postgres/hydra"),
            ("HYDRA_ROUTING_LISTEN", "0.0.0.0:8080"),
            ("HYDRA_METRICS_LISTEN", "0.0.0.0:9779"),
            (
                "HYDRA_ANNOUNCE",
                "/dns4/hydra-a.example.org/tcp/{port},/dns4/hydra-a.example.org/udp/{port}/quic-v1",
            ),
        ],
        None,
    );
    assert!(ok, "{err}");
}

#[test]
fn the_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() {
    let script = r#"
import sys
from dockerfile_parse import DockerfileParser
p = DockerfileParser(path="deploy/docker/Dockerfile")
froms = [i for i in p.structure if i["instruction"] == "FROM"]
assert len(froms) >= 2, "multi-stage: %d FROM" % len(froms)
last = max(i["startline"] for i in froms)
final = [i for i in p.structure if i["startline"] > last]
users = [i["value"] for i in final if i["instruction"] == "USER"]
assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage runs as %r" % users
assert any(i["instruction"] == "COPY" and "--from=build" in i["value"] for i in final), "binary from the build stage"
assert any(i["instruction"] == "HEALTHCHECK" and "ready" in i["value"] for i in final), "health check"
assert any(i["instruction"] == "RUN" and "cargo build --release --locked -p hydra" in i["value"] for i in p.structure)
print("ok", p.baseimage)
"#;
    let dir = py_tools();
    let out = Command::new("python3")
        .args(["-c", script])
        .env("PYTHONPATH", &dir)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The image's defaults are a valid configuration.
    let (ok, err) = hydra_check(
        &[
            ("HYDRA_DATA_DIR", "/var/lib/hydra"),
            ("HYDRA_LISTEN_IP", "0.0.0.0"),
            ("HYDRA_PORT_BASE", "4001"),
            ("HYDRA_HTTP_LISTEN", "127.0.0.1:7779"),
            ("HYDRA_METRICS_LISTEN", "0.0.0.0:9779"),
            ("HYDRA_LOG_FORMAT", "json"),
        ],
        None,
    );
    assert!(ok, "{err}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/hydra.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hydra.service");
    // systemd-analyze checks that the binary exists: point it at the one under test.
    std::fs::write(&path, unit.replace("/usr/local/bin/hydra", env!("CARGO_BIN_EXE_hydra"))).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (Debian package systemd)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // A bad directive is only a warning: every line naming the unit is a failure.
    let about_us: Vec<&str> = text.lines().filter(|l| l.contains("hydra")).collect();
    assert!(out.status.success() && about_us.is_empty(), "{text}");
}

#[test]
fn the_prometheus_configs_check_with_promtool() {
    for (config, alerts) in [
        ("deploy/prometheus/prometheus.yml", "deploy/prometheus/alerts.yml"),
        ("deploy/compose/prometheus.yml", "deploy/prometheus/alerts.yml"),
    ] {
        // As mounted: the rules file beside the config.
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(repo().join(config), dir.path().join("prometheus.yml")).unwrap();
        std::fs::copy(repo().join(alerts), dir.path().join("alerts.yml")).unwrap();
        let out = Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml"))
            .output()
            .expect("promtool is installed (Debian package prometheus)");
        assert!(
            out.status.success(),
            "{config}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
