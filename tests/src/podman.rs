//! Containers for the end-to-end tests: the shardline image built from
//! `deploy/container/Dockerfile` (its `runtime-prebuilt` target over this build's
//! binary, by `deploy/container/build-image.sh`) and the Helm chart's workloads run by
//! `podman kube play`, stopped (`kube down`) when dropped.
//!
//! podman runs with its own configuration (`CONTAINERS_CONF`): runc (crun fails on this
//! kernel's hybrid cgroups), cgroupfs (no systemd), and file and process limits the
//! runtime may set in this sandbox.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::workspace_root;

/// podman with the tests' configuration.
pub struct Podman {
    conf: tempfile::TempDir,
}

impl Podman {
    /// Checks the tools are there (panics saying how to get them) and writes the
    /// configuration.
    pub fn new() -> Podman {
        for (tool, package) in [
            ("podman", "podman"),
            ("runc", "runc"),
            ("catatonit", "catatonit"),
        ] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{tool} is missing: apt-get install podman runc catatonit debootstrap \
                 (deploy/setup.sh installs {package})"
            );
        }
        let conf = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            conf.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n",
        )
        .expect("write containers.conf");
        Podman { conf }
    }

    /// A command with this configuration: `podman` itself or a script that calls it.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("CONTAINERS_CONF", self.conf.path().join("containers.conf"));
        cmd
    }

    /// Runs `podman ARGS`; its output, whatever the status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command("podman")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
    }

    /// Runs `podman ARGS` and panics with its output unless it succeeds; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Builds the image `tag` from `binary` (the base image is made by debootstrap the
    /// first time) and returns its name.
    pub fn build_image(&self, binary: &Path, tag: &str) -> String {
        let script = workspace_root().join("deploy/container/build-image.sh");
        let out = self
            .command(&script)
            .args(["--binary".as_ref(), binary.as_os_str()])
            .args(["--tag", tag])
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman kube play FILE`: the workload runs until [`Played::down`] or drop.
    pub fn play<'a>(&'a self, file: &Path) -> Played<'a> {
        self.ok(&[
            "kube",
            "play",
            "--replace",
            "--quiet",
            file.to_str().expect("a UTF-8 path"),
        ]);
        Played {
            podman: self,
            file: Some(file.to_path_buf()),
        }
    }
}

impl Default for Podman {
    fn default() -> Self {
        Self::new()
    }
}

/// A workload `podman kube play` started.
pub struct Played<'a> {
    podman: &'a Podman,
    file: Option<PathBuf>,
}

impl Played<'_> {
    /// `podman kube down`: SIGTERM to its containers (SIGKILL after podman's stop
    /// timeout), then removes them. Returns how long it took.
    pub fn down(mut self) -> std::time::Duration {
        let start = std::time::Instant::now();
        if let Some(file) = self.file.take() {
            self.podman
                .ok(&["kube", "down", file.to_str().expect("a UTF-8 path")]);
        }
        start.elapsed()
    }
}

impl Drop for Played<'_> {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let out = self
                .podman
                .run(&["kube", "down", file.to_str().expect("a UTF-8 path")]);
            if !out.status.success() {
                eprintln!(
                    "podman kube down {}: {}",
                    file.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
