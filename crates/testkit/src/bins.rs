//! The workspace's real binaries, for tests that need separate processes
//! (several workers, signals, `kill -9`). They are built once per test run
//! with the same profile as the test itself.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The directory holding this profile's binaries (`target/debug`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // Tests live in target/<profile>/deps/, binaries in target/<profile>/.
    let dir = exe.parent().expect("executable directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The workspace the running executable was built in, when its sources
/// are still there and the executable is in its target directory: cargo
/// builds there whatever the working directory (thr-bench run from `/tmp`
/// used to fail with "could not find Cargo.toml"). None for an executable
/// copied or installed elsewhere.
fn workspace(bin_dir: &std::path::Path) -> Option<PathBuf> {
    // testkit is crates/testkit.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !root.join("Cargo.toml").is_file() {
        return None;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let (target, dir) = (target.canonicalize().ok()?, bin_dir.canonicalize().ok()?);
    dir.starts_with(target).then_some(root)
}

/// Path to binary `name`, building the daemons first (once per process).
/// An executable outside its workspace's target directory (binaries copied
/// elsewhere) uses the ones beside it as they are.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = bin_dir();
        let Some(root) = workspace(&dir) else {
            return;
        };
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root);
        if release {
            // The benchmark: just the daemons, optimized.
            cmd.args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "http2redis",
                "-p",
                "redis2http",
                "-p",
                "slowapp",
            ]);
        } else {
            // The same invocation as scripts/test.sh: same feature set, so in
            // a normal run this finds everything fresh and builds nothing.
            cmd.args(["build", "--quiet", "--workspace", "--all-targets"]);
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the daemons failed");
    });
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A daemon running as its own process; killed on drop.
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    /// Starts binary `name` with `args`; its logs go to the test's stderr.
    pub fn spawn(name: &str, args: &[&str]) -> Process {
        Process::spawn_path(&binary(name), args)
    }

    /// Starts the program at `path` with `args`.
    pub fn spawn_path(path: &std::path::Path, args: &[&str]) -> Process {
        let child = Command::new(path)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", path.display()));
        Process {
            child,
            name: path.display().to_string(),
        }
    }

    /// Takes charge of a child started some other way (killed on drop).
    pub fn adopt(child: Child, name: &str) -> Process {
        Process {
            child,
            name: name.to_string(),
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`"TERM"`, `"KILL"`, `"HUP"`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{signal} {} ({}) failed",
            self.pid(),
            self.name
        );
    }

    /// Waits for it to exit and returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        self.child.wait().expect("wait for child").code()
    }

    /// True while it runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
