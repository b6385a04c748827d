//! The daemons' configuration handling, through the real binaries.

use std::process::Command;

use testkit::bins::binary;

const VERBATIM: &str = r#"[redis]
url = "redis://127.0.0.1:6379"

[http2redis]
listen = "127.0.0.1:8080"
reply_timeout = "30s"

[[queues]]
name = "default"
backend = "http://127.0.0.1:9000"
max_inflight = 64
"#;

/// A file in a private temporary directory, removed with it when dropped.
struct TempFile {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for TempFile {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

/// Writes `text` to `name` in a new private directory.
fn write(name: &str, text: &str) -> TempFile {
    let dir = crate::support::temp_dir("thr-config-");
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    TempFile { path, _dir: dir }
}

#[test]
fn the_issue_example_passes_check_in_both_daemons() {
    let path = write("verbatim.toml", VERBATIM);
    for daemon in ["http2redis", "redis2http"] {
        let out = Command::new(binary(daemon))
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{daemon}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 queue)"));
    }
}

#[test]
fn the_shipped_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    for file in ["config/thr.toml", "config/demo.toml", "config/compose.toml"] {
        let out = Command::new(binary("http2redis"))
            .arg("--check")
            .arg("--config")
            .arg(root.join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_error_is_printed_and_nothing_is_bound() {
    let port = testkit::redis::free_port();
    let text = format!(
        "[redis]\nurl = \"redis://127.0.0.1:1\"\n\n[http2redis]\nlisten = \"127.0.0.1:{port}\"\nreply_timeout = \"soon\"\n\n[[queues]]\nname = \"default\"\nbackend = \"ftp://x\"\nmax_inflite = 3\n"
    );
    let path = write("bad.toml", &text);
    for daemon in ["http2redis", "redis2http"] {
        for check in [true, false] {
            let mut cmd = Command::new(binary(daemon));
            cmd.arg("--config").arg(&path);
            if check {
                cmd.arg("--check");
            }
            let out = cmd.output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{daemon}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let file = path.display().to_string();
            assert!(stderr.contains("3 errors"), "{stderr}");
            assert!(
                stderr.contains(&format!("{file}:6:17: `http2redis.reply_timeout`")),
                "{stderr}"
            );
            assert!(
                stderr.contains(&format!("{file}:10:11: `queues[0].backend`")),
                "{stderr}"
            );
            assert!(
                stderr.contains(&format!(
                    "{file}:11:1: `queues[0].max_inflite`: unknown key"
                )),
                "{stderr}"
            );
        }
    }
    // The front exited before binding its port.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn env_vars_name_the_config_and_override_redis() {
    let path = write("env.toml", VERBATIM);
    let out = Command::new(binary("http2redis"))
        .arg("--check")
        .env("THR_CONFIG", &path)
        .env("THR_REDIS_URL", "redis://10.0.0.1:6390")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

mod live {
    //! Reloads of real processes: a file edit (saved by rename, as editors
    //! do), a broken edit, and SIGHUP.

    use std::path::Path;
    use std::time::{Duration, Instant};

    use testkit::bins::Process;

    use crate::support::*;

    fn save_like_an_editor(path: &Path, text: &str) {
        let tmp = path.with_extension("swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    async fn wait_for(url: &str, target: &str, status: u16) -> Seen {
        let started = Instant::now();
        loop {
            // The daemons may still be starting: connection refused is "not yet".
            let seen = try_send(&client(), url, &Req::new("GET", target)).await;
            if let Some(seen) = &seen
                && seen.status == status
            {
                return seen.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{target}: still {:?} after 15 s",
                seen.map(|s| s.status)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn file_edits_and_sighup_reload_both_daemons() {
        testkit::init_logs();
        let redis = RedisServer::start();
        let one = SlowBackend::builder().start().await;
        let two = SlowBackend::builder().start().await;
        let port = testkit::redis::free_port();
        let config = |backend: &str, rules: &str| {
            config_text(&redis.url(), backend, rules)
                .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        };
        // Declared before the daemons: removed after they are killed.
        let dir = temp_dir("thr-reload-");
        let real = dir.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        // The daemons read `thr.toml`, a symlink into `real/`: edits inside
        // `real/` are invisible to the file watcher, so only SIGHUP sees them.
        let link = dir.path().join("thr.toml");
        std::fs::write(real.join("a.toml"), config(&one.url(), "")).unwrap();
        std::os::unix::fs::symlink(real.join("a.toml"), &link).unwrap();
        let path = link.display().to_string();
        let front = Process::spawn("http2redis", &["--config", &path]);
        let worker = Process::spawn("redis2http", &["--config", &path]);
        let url = format!("http://127.0.0.1:{port}");
        wait_for(&url, "/x", 200).await;
        assert_eq!(one.count(), 1);

        // 1. A saved edit: a new rule for the front, a new backend for the worker.
        save_like_an_editor(
            &link,
            &config(
                &two.url(),
                "[[rules]]\nwhen = { path = \"/x\" }\nthen = { status = 418 }\n",
            ),
        );
        wait_for(&url, "/x", 418).await;
        wait_for(&url, "/y", 200).await;
        let started = Instant::now();
        while two.count() == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the worker never switched backends"
            );
            wait_for(&url, "/y", 200).await;
        }

        // 2. A broken edit is refused; the running configuration stays.
        save_like_an_editor(&link, "[[queues]\nname = ");
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(wait_for(&url, "/x", 418).await.status, 418);

        // 3. SIGHUP: the link points into `real/` again; change that file.
        std::fs::remove_file(&link).unwrap();
        std::fs::write(
            real.join("b.toml"),
            config(
                &two.url(),
                "[[rules]]\nwhen = { path = \"/x\" }\nthen = { status = 200, body = \"v1\" }\n",
            ),
        )
        .unwrap();
        std::os::unix::fs::symlink(real.join("b.toml"), &link).unwrap();
        wait_for(&url, "/x", 200).await;
        std::fs::write(
            real.join("b.toml"),
            config(
                &two.url(),
                "[[rules]]\nwhen = { path = \"/x\" }\nthen = { status = 202, body = \"v2\" }\n",
            ),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            get(&url, "/x").await.status,
            200,
            "no reload without a signal"
        );
        front.signal("HUP");
        worker.signal("HUP");
        let seen = wait_for(&url, "/x", 202).await;
        assert_eq!(&seen.body[..], b"v2");

        drop((front, worker));
    }

    #[test]
    fn explain_prints_matches_and_the_result() {
        let dir = temp_dir("thr-explain-");
        let path = dir.path().join("rules.toml");
        std::fs::write(
            &path,
            format!(
                "{}\n{}",
                super::VERBATIM,
                r#"
[[rules]]
when = { path = "/forbidden" }
then = { status = 403, body = "forbidden\n" }
stop = true

[[rules]]
when = { header = { X-Priority = "high" } }
then = { priority = 1 }

[[rules]]
when = { path = { glob = "/reports/*" }, method = ["GET", "HEAD"] }
then = { priority = 80, set_headers = { X-Slow = "yes" } }
"#
            ),
        )
        .unwrap();
        let out = std::process::Command::new(testkit::bins::binary("http2redis"))
            .args(["explain", "--config"])
            .arg(&path)
            .args([
                "GET",
                "http://app.example/reports/q1",
                "-H",
                "X-Priority: high",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("1. rules[1] (line 19): priority = 1"),
            "{text}"
        );
        assert!(
            text.contains("2. rules[2] (line 23): priority = 80, set_headers x-slow"),
            "{text}"
        );
        assert!(text.contains("priority: 80"), "{text}");
        let out = std::process::Command::new(testkit::bins::binary("http2redis"))
            .args(["explain", "--config"])
            .arg(&path)
            .args(["POST", "/forbidden"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("answer directly: 403"));
    }
}
