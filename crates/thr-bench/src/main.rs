//! `thr-bench`: drives the same load straight at a backend, through thr and
//! (when installed) through HAProxy with a queue and through nginx, in one
//! run, and prints requests/s, p50 and p99 for each with their ratios to
//! the direct baseline.
//!
//! Every part is a real process on this machine: `redis-server` on a free
//! port, the demo backend `slowapp`, `redis2http`, `http2redis`, `haproxy`,
//! `nginx`.
//! The load generator is in this process (keep-alive connections, one
//! request at a time each). Two scenarios:
//!
//! - `overhead`: a backend with plenty of workers and no delay, so the
//!   figures are the cost of the router itself;
//! - `single`: the same backend and one connection sending one request at
//!   a time: the latency thr adds to every request of an idle system;
//! - `legacy`: a backend of 4 workers taking 20 ms each, the situation thr
//!   is for; thr and HAProxy both hold the excess in a queue (nginx, without
//!   one, passes all 64 connections on to the 4 workers);
//! - `claim`: the claim script alone, with 0 and then 10,000 jobs blocked
//!   behind a full quota: claim cost must not grow with blocked jobs
//!   (ARCHITECTURE.md decision 5);
//! - `scripts` (only when asked): the three job scripts alone, through the
//!   broker without HTTP, Redis's µs per job and per call of each, from
//!   SLOWLOG: the figures to compare two versions of a script with; then
//!   a bare lifecycle (`bare`) as the baseline, and thr's cost per job as
//!   a multiple of it;
//! - `soak` (only when asked): `--soak-duration` (10 min) of mixed load while
//!   a worker is killed with SIGKILL every minute and Redis is restarted
//!   once; prints requests sent, answered, 5xx, lost and the daemons' memory.
//!
//! Beside thr's figures, each scenario prints what a request through thr
//! costs: CPU µs of http2redis and of redis2http (from /proc), and Redis's
//! CPU µs (`INFO cpu`) and µs in scripts (`INFO commandstats`, wall clock:
//! on a busy machine it includes time Redis waited for a core), the
//! costliest commands (commandstats counts a command a script or a
//! transaction runs under its own name too, so these overlap); then how
//! much of that each job script takes (enqueue, claim, release) and how
//! many requests one call serves. The split by script comes from a second,
//! one-second run whose every call SLOWLOG logs: logging every command
//! makes Redis's calls about twice as slow, so it is kept out of the
//! measured run.
//!
//! Run: `cargo run --release -p thr-bench -- [--duration 5s] [--concurrency 64]`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use testkit::RedisServer;
use testkit::bins::{Process, binary};
use testkit::redis::free_port;

mod bare;
mod scripts;

/// Benchmark thr against the backend alone and HAProxy.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    /// Measuring time per target.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Scenarios to run: overhead, single, legacy, claim (and scripts, soak).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overhead,single,legacy,claim"
    )]
    scenarios: Vec<String>,
    /// Jobs per round of the `scripts` scenario (1: each script's cost per
    /// call); at most 1000, the most a claim starts.
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    script_jobs: usize,
    /// Length of the `soak` scenario (not in the default set).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    soak_duration: Duration,
    /// Log level of the thr daemons during the run (RUST_LOG).
    #[arg(long, default_value = "warn")]
    log: String,
}

struct Scenario {
    name: &'static str,
    workers: usize,
    delay: &'static str,
    max_inflight: usize,
    /// Client connections, when not `--concurrency`.
    connections: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
    /// Requests answered, warm-up included (what the CPU figures divide).
    answered: u64,
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    static TICKS: std::sync::LazyLock<f64> = std::sync::LazyLock::new(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    // utime is the 12th field after the command name, stime the 13th.
    let fields = stat_fields(pid);
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / *TICKS
}

/// The fields of /proc/`pid`/stat after the command name (which may hold
/// spaces): the state first, then the parent's pid; empty when `pid` is
/// gone.
fn stat_fields(pid: u32) -> Vec<String> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Vec::new();
    };
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after.split_whitespace().map(str::to_string).collect()
}

/// Times a process's threads have gone to sleep so far (voluntary context
/// switches, from /proc): each is a wake-up to pay for later. Unlike CPU
/// time, the count per request hardly moves with the machine's load, so a
/// change that saves a wake-up shows even on a noisy machine.
fn sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Redis's time so far: µs spent per command, as `INFO commandstats`
/// counts them (a command run by a script or by EXEC counts under its own
/// name as well as in the caller's time), and CPU seconds in all.
struct RedisTime {
    by_command: std::collections::HashMap<String, f64>,
    cpu: f64,
}

fn redis_time(redis: &RedisServer) -> RedisTime {
    let mut conn = redis.conn();
    let by_command: std::collections::HashMap<String, f64> = redis
        .command_stats()
        .into_iter()
        .map(|(name, stat)| (name, stat.usec))
        .collect();
    let cpu: String = redis::cmd("INFO")
        .arg("cpu")
        .query(&mut conn)
        .unwrap_or_default();
    let cpu = cpu
        .lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum();
    RedisTime { by_command, cpu }
}

/// The commands that took most of Redis's time between two readings, with
/// their µs per request, costliest first.
fn top_commands(before: &RedisTime, after: &RedisTime, requests: f64) -> String {
    let mut spent: Vec<(&str, f64)> = after
        .by_command
        .iter()
        .map(|(name, usec)| {
            let was = before.by_command.get(name).copied().unwrap_or(0.0);
            (name.as_str(), (usec - was) / requests)
        })
        .filter(|(_, us)| *us >= 0.5)
        .collect();
    spent.sort_by(|a, b| b.1.total_cmp(&a.1));
    spent
        .iter()
        .take(6)
        .map(|(name, us)| format!("{name} {us:.0} µs"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The job scripts whose share of Redis's time each scenario prints.
const JOB_SCRIPTS: [&str; 3] = ["enqueue", "claim", "release"];
/// Most calls SLOWLOG keeps during its run (past it, the last ones).
const SLOWLOG_KEEP: u32 = 100_000;
/// The run whose calls SLOWLOG logs, to split `EVALSHA` time by script.
const SLOWLOG_RUN: Duration = Duration::from_secs(1);

/// Calls of `EVALSHA` so far (`INFO commandstats`).
fn evalsha_calls(redis: &RedisServer) -> f64 {
    redis
        .command_stats()
        .get("evalsha")
        .map_or(0.0, |s| s.calls as f64)
}

/// From now on, Redis logs every command in SLOWLOG with its duration
/// (wall clock, as `INFO commandstats`).
pub(crate) fn slowlog_start(redis: &RedisServer) {
    let mut conn = redis.conn();
    for (name, value) in [
        ("slowlog-max-len", SLOWLOG_KEEP.to_string()),
        ("slowlog-log-slower-than", "0".to_string()),
    ] {
        let _: Result<(), _> = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(&mut conn);
    }
    let _: Result<(), _> = redis::cmd("SLOWLOG").arg("RESET").query(&mut conn);
}

/// Per job script, from the calls SLOWLOG logged since [`slowlog_start`]:
/// its share of the logged `EVALSHA` calls and of their time. Logging stops
/// here. (Logging every command makes Redis slower, so the figures printed
/// apply these shares to a run without it.)
fn slowlog_scripts(redis: &RedisServer) -> Vec<(&'static str, f64, f64)> {
    let (evalsha, evalsha_us, sums) = slowlog_sums(redis);
    sums.into_iter()
        .map(|(name, calls, us)| {
            (
                name,
                calls as f64 / evalsha.max(1) as f64,
                us as f64 / evalsha_us.max(1) as f64,
            )
        })
        .collect()
}

/// From the calls SLOWLOG logged since [`slowlog_start`]: the `EVALSHA`
/// calls and their µs, and per job script that ran, its calls and µs.
/// Logging stops here.
pub(crate) fn slowlog_sums(redis: &RedisServer) -> (usize, i64, Vec<(&'static str, usize, i64)>) {
    let scripts: Vec<(&'static str, &str)> = JOB_SCRIPTS
        .iter()
        .map(|&name| {
            (
                name,
                thr_broker::protocol::script_source(name).expect("a job script"),
            )
        })
        .collect();
    slowlog_sums_of(redis, &scripts)
}

/// [`slowlog_sums`] for `scripts` (name, Lua source).
pub(crate) fn slowlog_sums_of(
    redis: &RedisServer,
    scripts: &[(&'static str, &str)],
) -> (usize, i64, Vec<(&'static str, usize, i64)>) {
    let mut conn = redis.conn();
    let entries: redis::Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut conn)
        .unwrap_or(redis::Value::Nil);
    let _: Result<(), _> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(10_000)
        .query(&mut conn);
    let hashes: Vec<(&str, String)> = scripts
        .iter()
        .map(|&(name, source)| (name, redis::Script::new(source).get_hash().to_string()))
        .collect();
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).to_lowercase(),
        redis::Value::SimpleString(s) => s.to_lowercase(),
        _ => String::new(),
    };
    let (mut evalsha, mut evalsha_us) = (0usize, 0i64);
    let mut sums = vec![(0usize, 0i64); scripts.len()];
    let redis::Value::Array(entries) = entries else {
        return (0, 0, Vec::new());
    };
    for entry in entries {
        // [id, time, µs, [command and arguments], client, name]
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let (Some(redis::Value::Int(us)), Some(redis::Value::Array(args))) =
            (fields.get(2), fields.get(3))
        else {
            continue;
        };
        if args.first().map(text).as_deref() != Some("evalsha") {
            continue;
        }
        evalsha += 1;
        evalsha_us += us;
        let sha = args.get(1).map(text).unwrap_or_default();
        if let Some(i) = hashes.iter().position(|(_, h)| *h == sha) {
            sums[i].0 += 1;
            sums[i].1 += us;
        }
    }
    let sums = scripts
        .iter()
        .zip(sums)
        .filter(|(_, (calls, _))| *calls > 0)
        .map(|(&(name, _), (calls, us))| (name, calls, us))
        .collect();
    (evalsha, evalsha_us, sums)
}

async fn drive(url: &str, concurrency: usize, duration: Duration) -> Figures {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let url: Arc<str> = Arc::from(url);
    // Warm up connections and caches, unmeasured.
    let warm = Instant::now() + Duration::from_millis(500);
    let stop_at = warm + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                let mut answered = 0u64;
                let mut n = 0u64;
                loop {
                    let start = Instant::now();
                    if start >= stop_at {
                        break;
                    }
                    let uri: http::Uri = format!("{url}/bench/{i}/{n}?x=1").parse().expect("uri");
                    n += 1;
                    let ok = match client.get(uri).await {
                        Ok(resp) => {
                            let ok = resp.status().is_success();
                            ok && resp.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    answered += u64::from(ok);
                    if start >= warm {
                        if ok {
                            latencies.push(start.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                }
                (latencies, errors, answered)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut answered = 0;
    for t in tasks {
        let (l, e, a) = t.await.expect("load task");
        all.extend(l);
        errors += e;
        answered += a;
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Figures {
        rps: all.len() as f64 / duration.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
        answered,
    }
}

async fn wait_http(url: &str) {
    assert!(answers(url).await, "{url} did not come up");
}

/// True once `url` answers `/ready` with a success, false after 20 s.
async fn answers(url: &str) -> bool {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(uri) = format!("{url}/ready").parse::<http::Uri>()
            && let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), client.get(uri)).await
            && resp.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The first of `paths` that exists.
fn installed(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn haproxy() -> Option<PathBuf> {
    installed(&[
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ])
}

fn nginx() -> Option<PathBuf> {
    installed(&[
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ])
}

/// `pid` and its children (an nginx master and its workers), from /proc:
/// its `children` list, or where the kernel has none, every process whose
/// parent it is.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    match std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        Ok(children) => pids.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        ),
        Err(_) => {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return pids;
            };
            for entry in entries.flatten() {
                let Some(child) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let parent = stat_fields(child)
                    .get(1)
                    .and_then(|p| p.parse::<u32>().ok());
                if parent == Some(pid) {
                    pids.push(child);
                }
            }
        }
    }
    pids
}

/// Least CPU time (seconds) whose per-request figure is printed: /proc
/// counts in ticks of 10 ms.
const MEASURABLE_CPU: f64 = 0.05;

/// A proxy measured beside thr: HAProxy or nginx.
struct Peer {
    name: &'static str,
    url: String,
    process: Process,
}

impl Peer {
    /// The peer `name` that `process` runs, once it serves on `port`; or
    /// why not (it did not come up: the scenario goes on without it).
    async fn start(name: &'static str, process: Process, port: u16) -> Result<Peer, String> {
        let url = format!("http://127.0.0.1:{port}");
        // Made before the wait, so that a peer that never comes up is
        // stopped like one that did.
        let peer = Peer { name, url, process };
        if answers(&peer.url).await {
            Ok(peer)
        } else {
            Err(format!("{name}: did not come up on {} — skipped", peer.url))
        }
    }

    /// CPU seconds and sleeps of the peer's processes so far.
    fn usage(&self) -> (f64, u64) {
        process_tree(self.process.pid())
            .into_iter()
            .fold((0.0, 0), |(cpu, slept), pid| {
                (cpu + cpu_seconds(pid), slept + sleeps(pid))
            })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // An nginx master stops its workers on TERM; killed, it would leave
        // them serving the port. So TERM, and the kill (Process's drop)
        // only after it has exited or 5 s have passed.
        if !self.process.is_running() {
            return;
        }
        self.process.signal("TERM");
        let started = Instant::now();
        while self.process.is_running() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Why a peer that is not installed is skipped.
fn not_installed(package: &str) -> String {
    format!("{package}: not installed (apt-get install {package}) — skipped")
}

/// HAProxy in front of the backend, with a queue of `max_inflight`
/// (`maxconn`), when installed.
async fn start_haproxy(
    dir: &std::path::Path,
    scenario: &str,
    backend_port: u16,
    max_inflight: usize,
) -> Result<Peer, String> {
    let bin = haproxy().ok_or_else(|| not_installed("haproxy"))?;
    let port = free_port();
    let cfg = dir.join(format!("haproxy-{scenario}.cfg"));
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout queue 60s\n  option http-keep-alive\nfrontend f\n  bind 127.0.0.1:{port}\n  default_backend b\nbackend b\n  server app 127.0.0.1:{backend_port} maxconn {max_inflight}\n"
        ),
    )
    .expect("haproxy config");
    let process = Process::spawn_path(&bin, &["-db", "-f", &cfg.display().to_string()]);
    Peer::start("haproxy", process, port).await
}

/// nginx in front of the backend, as it is commonly set up: one worker per
/// core, keep-alive connections to the backend. Open-source nginx has no
/// queue (`max_conns` without one refuses the excess with 502), so it
/// passes every connection on: a peer for the cost of proxying, not for
/// protecting the backend.
async fn start_nginx(
    dir: &std::path::Path,
    scenario: &str,
    backend_port: u16,
) -> Result<Peer, String> {
    let bin = nginx().ok_or_else(|| not_installed("nginx"))?;
    let port = free_port();
    let prefix = dir.join(format!("nginx-{scenario}"));
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx prefix");
    let p = prefix.display();
    let cfg = prefix.join("nginx.conf");
    std::fs::write(
        &cfg,
        format!(
            "daemon off;\nworker_processes auto;\nuser root;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  upstream b {{ server 127.0.0.1:{backend_port}; keepalive 256; keepalive_requests 1000000; }}\n  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
        ),
    )
    .expect("nginx config");
    let process = Process::spawn_path(
        &bin,
        &["-p", &p.to_string(), "-c", &cfg.display().to_string()],
    );
    Peer::start("nginx", process, port).await
}

/// Drives the scenario's load through `peer` and prints its row, its
/// sleeps and CPU per request beside thr's (`thr_cpu` µs: daemons and
/// Redis), and thr's ratios to it.
async fn measure_peer(
    peer: &Peer,
    backend: &Process,
    connections: usize,
    duration: Duration,
    direct: &Figures,
    through: &Figures,
    thr_cpu: f64,
) {
    let per_request = |n: u64, answered: u64| n as f64 / answered.max(1) as f64;
    let before = (peer.usage(), sleeps(backend.pid()));
    let h = drive(&peer.url, connections, duration).await;
    let after = (peer.usage(), sleeps(backend.pid()));
    let name = peer.name;
    let used = after.0.0 - before.0.0;
    let cpu = used * 1e6 / h.answered.max(1) as f64;
    print_row(name, &h, direct);
    println!(
        "  {name} sleeps per request (voluntary context switches): {name} {:.2}, backend {:.2}",
        per_request(after.0.1.saturating_sub(before.0.1), h.answered),
        per_request(after.1.saturating_sub(before.1), h.answered),
    );
    // /proc counts CPU time in ticks of 10 ms: below a few, the figure
    // would be mostly rounding.
    if used >= MEASURABLE_CPU {
        println!(
            "  {name} cost per request: {cpu:.0} µs CPU; thr's daemons and Redis {thr_cpu:.0} µs (x{:.1})",
            thr_cpu / cpu.max(1e-9)
        );
    } else {
        println!(
            "  {name} cost per request: too little CPU in all to measure ({:.0} ms, in ticks of 10 ms)",
            used * 1e3
        );
    }
    println!(
        "  thr / {name}: x{:.2} rps, x{:.2} p50",
        through.rps / h.rps.max(1e-9),
        through.p50.as_secs_f64() / h.p50.as_secs_f64().max(1e-9)
    );
}

fn print_row(name: &str, f: &Figures, base: &Figures) {
    println!(
        "  {name:<10} {:>9.0} req/s {:>9.2} ms p50 {:>9.2} ms p99 {:>6} errors   x{:.2} rps, x{:.2} p50 vs direct",
        f.rps,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3,
        f.errors,
        f.rps / base.rps.max(1e-9),
        f.p50.as_secs_f64() / base.p50.as_secs_f64().max(1e-9),
    );
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Removed when dropped, also when a scenario panics (a daemon that does
    // not come up), so that no run leaves its configs and logs behind.
    let tmp = tempfile::Builder::new()
        .prefix("thr-bench-")
        .tempdir()
        .expect("bench dir");
    let dir = tmp.path().to_path_buf();
    let scenarios = [
        Scenario {
            name: "overhead",
            workers: 256,
            delay: "0ms",
            max_inflight: 64,
            connections: None,
        },
        Scenario {
            name: "single",
            workers: 256,
            delay: "0ms",
            max_inflight: 64,
            connections: Some(1),
        },
        Scenario {
            name: "legacy",
            workers: 4,
            delay: "20ms",
            max_inflight: 4,
            connections: None,
        },
    ];
    println!(
        "thr-bench: {} connections, {:?} per target, daemons logging at `{}`",
        cli.concurrency, cli.duration, cli.log
    );
    for s in scenarios
        .iter()
        .filter(|s| cli.scenarios.iter().any(|n| n == s.name))
    {
        let redis = RedisServer::start();
        let backend_port = free_port();
        let front_port = free_port();
        let backend = Process::spawn(
            "slowapp",
            &[
                "--listen",
                &format!("127.0.0.1:{backend_port}"),
                "--workers",
                &s.workers.to_string(),
                "--delay",
                s.delay,
            ],
        );
        let config = dir.join(format!("{}.toml", s.name));
        std::fs::write(
            &config,
            format!(
                "[redis]\nurl = \"{}\"\n[http2redis]\nlisten = \"127.0.0.1:{front_port}\"\nreply_timeout = \"60s\"\n[[queues]]\nname = \"default\"\nbackend = \"http://127.0.0.1:{backend_port}\"\nmax_inflight = {}\n",
                redis.url(),
                s.max_inflight
            ),
        )
        .expect("write config");
        let config = config.display().to_string();
        let daemon = |name: &str| {
            let mut cmd = std::process::Command::new(binary(name));
            cmd.args(["--config", &config])
                .env("RUST_LOG", &cli.log)
                .stderr(std::process::Stdio::null());
            Process::adopt(cmd.spawn().expect("spawn daemon"), name)
        };
        let worker = daemon("redis2http");
        let front = daemon("http2redis");

        let direct_url = format!("http://127.0.0.1:{backend_port}");
        let thr_url = format!("http://127.0.0.1:{front_port}");
        wait_http(&direct_url).await;
        wait_http(&thr_url).await;

        let haproxy = start_haproxy(&dir, s.name, backend_port, s.max_inflight).await;
        let nginx = start_nginx(&dir, s.name, backend_port).await;

        let connections = s.connections.unwrap_or(cli.concurrency);
        println!(
            "\nscenario `{}`: backend {} workers, {} per request; thr max_inflight {}; {connections} connection(s)",
            s.name, s.workers, s.delay, s.max_inflight
        );
        // Sleeps of the thr daemons, Redis and the backend.
        let thr_sleeps = || {
            [
                sleeps(front.pid()),
                sleeps(worker.pid()),
                sleeps(redis.pid()),
                sleeps(backend.pid()),
            ]
        };
        let backend_sleeps = sleeps(backend.pid());
        let direct = drive(&direct_url, connections, cli.duration).await;
        print_row("direct", &direct, &direct);
        let direct_sleeps = sleeps(backend.pid()).saturating_sub(backend_sleeps);
        let before = (
            cpu_seconds(front.pid()),
            cpu_seconds(worker.pid()),
            redis_time(&redis),
            evalsha_calls(&redis),
            thr_sleeps(),
        );
        let through = drive(&thr_url, connections, cli.duration).await;
        let after = (
            cpu_seconds(front.pid()),
            cpu_seconds(worker.pid()),
            redis_time(&redis),
            evalsha_calls(&redis),
            thr_sleeps(),
        );
        print_row("thr", &through, &direct);
        let per_request = |n: u64, answered: u64| n as f64 / answered.max(1) as f64;
        let slept: Vec<f64> = (0..4)
            .map(|i| per_request(after.4[i].saturating_sub(before.4[i]), through.answered))
            .collect();
        println!(
            "  thr sleeps per request (voluntary context switches): http2redis {:.2}, redis2http {:.2}, Redis {:.2}, backend {:.2} (direct: backend {:.2})",
            slept[0],
            slept[1],
            slept[2],
            slept[3],
            per_request(direct_sleeps, direct.answered),
        );
        let per = |seconds: f64| seconds * 1e6 / (through.answered.max(1) as f64);
        let evalsha_us = after.2.by_command.get("evalsha").copied().unwrap_or(0.0)
            - before.2.by_command.get("evalsha").copied().unwrap_or(0.0);
        // What thr's three processes spend per request, to set beside
        // HAProxy's.
        let thr_cpu =
            per(after.0 - before.0) + per(after.1 - before.1) + per(after.2.cpu - before.2.cpu);
        println!(
            "  thr cost per request: http2redis {:.0} µs CPU, redis2http {:.0} µs CPU, Redis {:.0} µs CPU ({:.0} µs in scripts, wall clock)",
            per(after.0 - before.0),
            per(after.1 - before.1),
            per(after.2.cpu - before.2.cpu),
            per(evalsha_us / 1e6),
        );
        println!(
            "  Redis per request, by command (commandstats, wall clock): {}",
            top_commands(&before.2, &after.2, through.answered.max(1) as f64)
        );
        // Each job script's share of the EVALSHA calls and time, from a
        // short second run that SLOWLOG logs whole, applied to the figures
        // of the run above.
        slowlog_start(&redis);
        drive(&thr_url, connections, SLOWLOG_RUN).await;
        let scripts = slowlog_scripts(&redis);
        let answered = through.answered.max(1) as f64;
        let by_script: Vec<String> = scripts
            .iter()
            .map(|(name, call_share, time_share)| {
                let calls = call_share * (after.3 - before.3);
                format!(
                    "{name} {:.0} µs ({:.1} requests per call)",
                    time_share * evalsha_us / answered,
                    answered / calls.max(1.0)
                )
            })
            .collect();
        println!(
            "  Redis per request, by script (commandstats, split by SLOWLOG): {}",
            by_script.join(", ")
        );
        for peer in [&haproxy, &nginx] {
            match peer {
                Ok(peer) => {
                    measure_peer(
                        peer,
                        &backend,
                        connections,
                        cli.duration,
                        &direct,
                        &through,
                        thr_cpu,
                    )
                    .await
                }
                Err(why) => println!("  {why}"),
            }
        }
        drop((front, worker, haproxy, nginx, backend));
    }
    if cli.scenarios.iter().any(|n| n == "claim") {
        claim_scenario().await;
    }
    if cli.scenarios.iter().any(|n| n == "scripts") {
        scripts::scenario(cli.script_jobs).await;
    }
    if cli.scenarios.iter().any(|n| n == "soak") {
        soak(cli.soak_duration, &dir).await;
    }
    drop(tmp);
}

/// Jobs started per second of free jobs, with `blocked` jobs waiting behind
/// a saturated concurrency quota, starting up to `per_call` jobs per claim.
async fn claim_rate(blocked: usize, per_call: usize) -> f64 {
    use futures_util::future::join_all;
    use thr_broker::{Broker, ClaimOptions, ClaimOutcome, NewJob, RedisBroker};
    use thr_core::quota::{Flow, QuotaKey};

    const FREE: usize = 5000;
    let redis = RedisServer::start();
    let broker = RedisBroker::new(&redis.url(), Duration::from_secs(5)).expect("broker");
    let broker = &broker;
    let job = |id: String, flow: &'static Flow| async move {
        let frame = bytes::Bytes::from_static(b"THRQ-bench");
        let job = NewJob {
            queue: "bench",
            id: &id,
            priority: 50,
            frame,
            timeout: Duration::from_secs(600),
            flow,
            max_waiting: None,
            max_wait_boost: None,
            front: "",
            method: "GET",
        };
        broker.enqueue(job).await.expect("enqueue");
    };
    // Every claim call has a token of its own (a repeated token would
    // return the first call's jobs again).
    let tokens = std::sync::atomic::AtomicU64::new(0);
    fn options(max_jobs: usize, token: &str) -> ClaimOptions<'_> {
        ClaimOptions {
            token,
            lease: Duration::from_secs(600),
            max_inflight_total: None,
            max_wait_boost: None,
            worker: "",
            max_jobs,
            retry_methods: &[],
            ahead: false,
        }
    }
    let next_token = || {
        format!(
            "t{}",
            tokens.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    };
    static FREE_FLOW: std::sync::LazyLock<Flow> = std::sync::LazyLock::new(Flow::default);
    static BLOCKED: std::sync::LazyLock<Flow> = std::sync::LazyLock::new(|| Flow {
        quotas: vec![QuotaKey {
            token: "foo_bar=bar".into(),
            max_concurrent: 2,
            interval_ms: 0.0,
            burst: 0,
            max_waiting: 0,
        }],
    });
    // Two running jobs fill the quota; the rest of the flow waits behind it.
    if blocked > 0 {
        for chunk in (0..blocked + 2).collect::<Vec<_>>().chunks(200) {
            join_all(chunk.iter().map(|i| job(format!("b{i}"), &BLOCKED))).await;
        }
        for _ in 0..2 {
            let token = next_token();
            assert!(matches!(
                broker.claim("bench", options(1, &token)).await,
                Ok(ClaimOutcome::Jobs(_))
            ));
        }
    }
    for chunk in (0..FREE).collect::<Vec<_>>().chunks(200) {
        join_all(chunk.iter().map(|i| job(format!("f{i}"), &FREE_FLOW))).await;
    }
    let started = Instant::now();
    let mut claimed = 0usize;
    // Eight claimers at once, as eight worker loops would.
    let claimers = (0..8).map(|_| async {
        let mut n = 0usize;
        loop {
            let token = next_token();
            match broker.claim("bench", options(per_call, &token)).await {
                Ok(ClaimOutcome::Jobs(jobs)) => n += jobs.len(),
                _ => break,
            }
        }
        n
    });
    for n in join_all(claimers).await {
        claimed += n;
    }
    assert_eq!(claimed, FREE, "every free job was claimed, no blocked one");
    FREE as f64 / started.elapsed().as_secs_f64()
}

async fn claim_scenario() {
    println!("\nscenario `claim`: jobs started/s of 5,000 free jobs, 8 claimers");
    let free = claim_rate(0, 1).await;
    println!("  {:>6} blocked jobs, 1 per call   {free:>9.0} starts/s", 0);
    let busy = claim_rate(10_000, 1).await;
    println!(
        "  {:>6} blocked jobs, 1 per call   {busy:>9.0} starts/s   x{:.2} vs none blocked",
        10_000,
        busy / free
    );
    let batched = claim_rate(0, 16).await;
    println!(
        "  {:>6} blocked jobs, 16 per call  {batched:>9.0} starts/s   x{:.2} vs 1 per call",
        0,
        batched / free
    );
    let batched_busy = claim_rate(10_000, 16).await;
    println!(
        "  {:>6} blocked jobs, 16 per call  {batched_busy:>9.0} starts/s   x{:.2} vs none blocked",
        10_000,
        batched_busy / batched
    );
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Mixed load for `length` while workers are killed and Redis restarts.
async fn soak(length: Duration, dir: &std::path::Path) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let mut redis = RedisServer::start();
    let backend_port = free_port();
    let front_port = free_port();
    let _backend = Process::spawn(
        "slowapp",
        &[
            "--listen",
            &format!("127.0.0.1:{backend_port}"),
            "--workers",
            "16",
            "--delay",
            "5ms",
        ],
    );
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"{}\"\n[http2redis]\nlisten = \"127.0.0.1:{front_port}\"\nreply_timeout = \"30s\"\nredis_down_grace = \"5s\"\n[[queues]]\nname = \"default\"\nbackend = \"http://127.0.0.1:{backend_port}\"\nmax_inflight = 8\nlease = \"10s\"\n[[limits]]\nname = \"per_user\"\nby = {{ header = \"X-User\" }}\nmax_concurrent = 4\n",
            redis.url()
        ),
    )
    .expect("soak config");
    let config = config.display().to_string();
    let spawn = |name: &str| Process::spawn(name, &["--config", &config]);
    let front = spawn("http2redis");
    let mut workers = [spawn("redis2http"), spawn("redis2http")];
    let url = format!("http://127.0.0.1:{front_port}");
    wait_http(&url).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start: Vec<u64> = std::iter::once(front.pid())
        .chain(workers.iter().map(Process::pid))
        .map(rss_kib)
        .collect();

    let sent = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let errors5xx = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + length;
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (sent, answered, errors5xx, url) = (
                sent.clone(),
                answered.clone(),
                errors5xx.clone(),
                url.clone(),
            );
            tokio::spawn(async move {
                let client: Client<_, http_body_util::Full<bytes::Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                let mut n = 0u64;
                while Instant::now() < stop_at {
                    n += 1;
                    let method = if n.is_multiple_of(5) { "POST" } else { "GET" };
                    let req = http::Request::builder()
                        .method(method)
                        .uri(format!("{url}/soak/{i}/{n}?bytes={}", n % 2048))
                        .header("x-user", format!("user{}", i % 5))
                        .body(http_body_util::Full::new(bytes::Bytes::from(
                            vec![7u8; (n % 4096) as usize],
                        )))
                        .expect("request");
                    sent.fetch_add(1, Ordering::Relaxed);
                    if let Ok(Ok(resp)) =
                        tokio::time::timeout(Duration::from_secs(40), client.request(req)).await
                    {
                        let status = resp.status();
                        if resp.into_body().collect().await.is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                            if status.is_server_error() {
                                errors5xx.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut redis_restarted = false;
    let mut kills = 0;
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = started.elapsed().as_secs();
        // No kill in the last half minute: the end-of-run memory is a steady worker's.
        if t > 0 && t.is_multiple_of(60) && started.elapsed() + Duration::from_secs(30) < length {
            let victim = kills % workers.len();
            workers[victim].signal("KILL");
            workers[victim].wait();
            workers[victim] = spawn("redis2http");
            kills += 1;
            println!("  t={t:>4}s  killed a worker with SIGKILL ({kills} so far)");
        }
        if !redis_restarted && started.elapsed() >= length / 2 {
            redis.restart();
            redis_restarted = true;
            println!("  t={t:>4}s  restarted Redis (empty)");
        }
    }
    for c in clients {
        let _ = c.await;
    }
    let rss_end: Vec<u64> = std::iter::once(front.pid())
        .chain(workers.iter().map(Process::pid))
        .map(rss_kib)
        .collect();
    let (sent, answered, errors5xx) = (
        sent.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
        errors5xx.load(Ordering::Relaxed),
    );
    println!(
        "\nscenario `soak`: {length:?}, 16 clients, {kills} worker kills, Redis restarted once"
    );
    println!(
        "  sent {sent}, answered {answered}, 5xx {errors5xx}, lost {}",
        sent - answered
    );
    println!(
        "  memory (RSS KiB): front {} -> {}, first worker slot {} -> {}, second {} -> {} (killed workers are replaced)",
        rss_start[0], rss_end[0], rss_start[1], rss_end[1], rss_start[2], rss_end[2]
    );
}
