//! A private `redis-server` for one test (or one test binary).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` on 127.0.0.1 and a free port, and on a unix
/// socket in its own directory; killed (and its directory removed) on drop.
pub struct RedisServer {
    port: u16,
    /// Removed when dropped, after [`Drop`] has killed the server.
    dir: tempfile::TempDir,
    child: Option<Child>,
    password: Option<String>,
    tls_port: Option<u16>,
}

/// The `redis-server` binary: `$THR_REDIS_SERVER`, else from `PATH`.
pub fn redis_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("THR_REDIS_SERVER") {
        return PathBuf::from(path);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
    ]) {
        let candidate = Path::new(dir).join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "redis-server not found: install it (apt-get install redis-server) or set THR_REDIS_SERVER"
    );
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with_password(None)
    }

    /// Starts a server that requires `password` (`requirepass`).
    pub fn start_with_password(password: Option<&str>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("thr-redis-")
            .tempdir()
            .expect("redis test directory");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
            password: password.map(str::to_string),
            tls_port: None,
        };
        for _ in 0..5 {
            if server.spawn() {
                return server;
            }
            // Lost a race for the port: try another one.
            server.port = free_port();
        }
        // Dropping `server` removes its directory.
        panic!("redis-server did not start after 5 attempts");
    }

    fn spawn(&mut self) -> bool {
        let mut command = Command::new(redis_server_binary());
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        if let Some(port) = self.tls_port {
            let dir = self.dir.path();
            let (cert, key) = (dir.join("redis.crt"), dir.join("redis.key"));
            command
                .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.crt"));
        }
        let mut child = command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--unixsocket", &self.socket_path().display().to_string()])
            .args(["--unixsocketperm", "700"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .args(["--loglevel", "warning"])
            // Fault tests slow Redis down with DEBUG SLEEP.
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if self.ping() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        let ping = match &self.password {
            Some(p) => format!("AUTH {p}\r\nPING\r\n"),
            None => "PING\r\n".to_string(),
        };
        let mut ok = [0u8; 5];
        s.write_all(ping.as_bytes()).is_ok()
            && (self.password.is_none() || s.read_exact(&mut ok).is_ok())
            && s.read_exact(&mut buf).is_ok()
            && &buf == b"+PONG\r\n"
    }

    /// Starts a server that also speaks TLS, with a certificate signed by a
    /// private CA made by `openssl`; see [`RedisServer::tls_url`].
    pub fn start_tls() -> RedisServer {
        let mut server = RedisServer::start();
        server.kill();
        let dir = server.dir.path().to_path_buf();
        let openssl = |args: &[&str]| {
            let ok = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run openssl")
                .success();
            assert!(ok, "openssl {args:?} failed");
        };
        // A private CA, and a server certificate for 127.0.0.1 signed by it.
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("write san.ext");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=thr test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "redis.key",
            "-out",
            "redis.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "redis.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "redis.crt",
        ]);
        server.tls_port = Some(free_port());
        server.restart();
        server
    }

    /// `rediss://127.0.0.1:TLS_PORT/#insecure` (the CA is not a system root).
    pub fn tls_url(&self) -> String {
        format!(
            "rediss://127.0.0.1:{}/#insecure",
            self.tls_port.expect("started with start_tls")
        )
    }

    /// The CA that signed a [`RedisServer::start_tls`] server's certificate.
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// `redis://127.0.0.1:PORT` (with the password when there is one).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// `redis+unix:///…/redis.sock`.
    pub fn unix_url(&self) -> String {
        format!("redis+unix://{}", self.socket_path().display())
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (0 while it is killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// A client for direct inspection.
    pub fn client(&self) -> ::redis::Client {
        ::redis::Client::open(self.url()).expect("redis client")
    }

    /// A synchronous connection for direct inspection.
    pub fn conn(&self) -> ::redis::Connection {
        self.client().get_connection().expect("redis connection")
    }

    /// `CONFIG SET name value`, panicking if Redis refuses it.
    pub fn config_set(&self, name: &str, value: &str) {
        let _: () = ::redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(&mut self.conn())
            .unwrap_or_else(|e| panic!("CONFIG SET {name} {value}: {e}"));
    }

    /// `INFO commandstats` by command name (`evalsha`, `blmpop`,
    /// `config|resetstat`): what Redis counted since it started or since
    /// `CONFIG RESETSTAT`, the commands scripts call included.
    pub fn command_stats(&self) -> HashMap<String, CommandStat> {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn())
            .unwrap_or_default();
        parse_command_stats(&info)
    }

    /// Kills the server (SIGKILL): its data is gone, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        // The port may linger briefly; keep trying.
        while !self.spawn() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "redis-server did not restart"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One command's line of `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommandStat {
    /// Calls, refused ones excluded.
    pub calls: u64,
    /// Time in the command, µs (wall clock).
    pub usec: f64,
    /// Calls refused before running (an ACL, a wrong arity).
    pub rejected_calls: u64,
}

impl CommandStat {
    /// Mean µs per call (0 without calls).
    pub fn usec_per_call(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.usec / self.calls as f64
        }
    }
}

/// `cmdstat_NAME:calls=…,usec=…,usec_per_call=…,rejected_calls=…,…` lines.
fn parse_command_stats(info: &str) -> HashMap<String, CommandStat> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let mut stat = CommandStat::default();
            for (key, value) in fields.split(',').filter_map(|f| f.split_once('=')) {
                match key {
                    "calls" => stat.calls = value.parse().ok()?,
                    "usec" => stat.usec = value.parse().ok()?,
                    "rejected_calls" => stat.rejected_calls = value.parse().ok()?,
                    _ => {}
                }
            }
            Some((name.to_string(), stat))
        })
        .collect()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // The directory (`self.dir`) is removed after this, when the
        // fields are dropped: the server is gone by then.
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_stats_lines_are_read_by_name() {
        let info = "# Commandstats\r\n\
            cmdstat_evalsha:calls=12,usec=300,usec_per_call=25.00,rejected_calls=1,failed_calls=0\r\n\
            cmdstat_config|resetstat:calls=1,usec=5,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n";
        let stats = parse_command_stats(info);
        assert_eq!(
            stats["evalsha"],
            CommandStat {
                calls: 12,
                usec: 300.0,
                rejected_calls: 1
            }
        );
        assert_eq!(stats["evalsha"].usec_per_call(), 25.0);
        assert_eq!(stats["config|resetstat"].calls, 1);
        assert_eq!(stats.len(), 2);
    }
}
