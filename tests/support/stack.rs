//! The throwaway PostgreSQL + kube-apiserver stack (`scripts/stack.sh`) with the Tenant CRD
//! installed: one module shared by the integration tests and the benchmarks (each includes it
//! with `#[path]`), so that both start and prepare their servers the same way.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Connection details of a running stack.
pub struct Stack {
    pub database_url: String,
    pub kubeconfig: PathBuf,
    /// The stack's directory, when this process started it (`None` for servers given from
    /// outside, which the tests must not stop).
    pub dir: Option<PathBuf>,
}

/// Fault injection on a stack this process started (`scripts/stack.sh stop-pg` and friends);
/// each call blocks until done (a started server is ready).
#[allow(dead_code)] // used by the integration tests, not by the benchmarks
impl Stack {
    fn script(&self, command: &str) {
        let dir = self
            .dir
            .as_ref()
            .expect("only a stack started by this process can be stopped and started");
        script(command, dir);
    }

    /// Stops PostgreSQL in immediate mode: every session is cut, nothing is checkpointed.
    pub fn stop_postgres(&self) {
        self.script("stop-pg");
    }

    /// Starts PostgreSQL again (crash recovery) on the same port; returns once it accepts.
    pub fn start_postgres(&self) {
        self.script("start-pg");
    }

    /// Kills the kube-apiserver (etcd keeps the objects).
    pub fn stop_apiserver(&self) {
        self.script("stop-apiserver");
    }

    /// Starts the kube-apiserver again on the same port; returns once it is ready.
    pub fn start_apiserver(&self) {
        self.script("start-apiserver");
    }
}

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts PostgreSQL and a kube-apiserver in a new temporary directory (named `prefix…`),
/// stopped when this process exits.
pub fn start(prefix: &str) -> Stack {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
        .keep();
    let pid = std::process::id().to_string();
    let text = stack_sh(&[
        "start".as_ref(),
        dir.as_os_str(),
        "--watch-pid".as_ref(),
        pid.as_ref(),
    ]);
    let get = |k: &str| env_value(&text, k);
    Stack {
        database_url: get("DATABASE_URL"),
        kubeconfig: get("KUBECONFIG").into(),
        dir: Some(dir),
    }
}

/// Runs `scripts/stack.sh` with `args` to completion; returns what it printed.
fn stack_sh(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(repo().join("scripts/stack.sh"))
        .args(args)
        .output()
        .expect("running scripts/stack.sh");
    assert!(
        out.status.success(),
        "scripts/stack.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of `KEY=value` in what `stack.sh` printed.
fn env_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("stack.sh printed no {key}"))
        .to_string()
}

/// Runs `scripts/stack.sh COMMAND DIR` to completion.
#[allow(dead_code)] // used by the integration tests, not by the benchmarks
fn script(command: &str, dir: &Path) {
    stack_sh(&[command.as_ref(), dir.as_os_str()]);
}

/// Another PostgreSQL server, in its own temporary directory, stopped when this process exits.
#[allow(dead_code)] // used by the integration tests, not by the benchmarks
pub struct Server {
    /// Its superuser's URL.
    pub url: String,
    /// Its `scripts/stack.sh stop-pg`/`start-pg` directory.
    pub dir: PathBuf,
}

#[allow(dead_code)]
impl Server {
    pub fn start(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tenantry-server-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let pid = std::process::id().to_string();
        let text = stack_sh(&[
            "start-server".as_ref(),
            dir.as_os_str(),
            name.as_ref(),
            "--watch-pid".as_ref(),
            pid.as_ref(),
        ]);
        let url = env_value(&text, "DATABASE_URL");
        Self {
            url,
            dir: dir.join("servers").join(name),
        }
    }

    fn script(&self, command: &str) {
        script(command, &self.dir);
    }

    /// Stops it in immediate mode (every session cut).
    pub fn stop(&self) {
        self.script("stop-pg");
    }

    /// Starts it again on the same port.
    pub fn start_again(&self) {
        self.script("start-pg");
    }
}

/// Runs kubectl with `kubeconfig` from the repository root.
pub fn kubectl_with(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(repo())
        .output()
        .expect("running kubectl")
}

/// Installs (or updates) the Tenant CRD and waits until it is established.
pub fn install_crd(kubeconfig: &Path) {
    let out = kubectl_with(
        kubeconfig,
        &[
            // The test apiserver (1.20) predates `x-kubernetes-validations`: kubectl's
            // validation and server-side apply refuse the field, a plain apply is stored
            // without it (README, "Install", Kubernetes before 1.25).
            "apply",
            "--validate=false",
            "-f",
            "crds/tenant.yaml",
            "-f",
            "crds/tenantrollout.yaml",
            "-f",
            "crds/postgresserver.yaml",
        ],
    );
    assert!(
        out.status.success(),
        "installing the CRD failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl_with(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "crd/tenants.tenantry.dev",
            "crd/tenantrollouts.tenantry.dev",
            "crd/postgresservers.tenantry.dev",
            "--timeout=60s",
        ],
    );
    assert!(
        out.status.success(),
        "CRD not established: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
