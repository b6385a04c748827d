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

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("thr-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
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
