//! The Grafana dashboard (`contrib/grafana/thr-dashboard.json`) against the
//! real `/metrics` of both daemons: every metric name a panel or a template
//! variable queries must be one the daemons expose.
//!
//! The exporter shows a metric only once its `counter!`/`gauge!`/
//! `histogram!` call site has run, and most of thr's call sites run on an
//! event (a refusal, a timeout, a lost worker, a Redis error…). So the test
//! provokes each event the dashboard charts, cheaply, on real processes (the
//! recorder is per process): a rejected edge client, a full limit, a reply
//! timeout, an upgrade request, connections past `max_connections`, a
//! worker killed with a job running, a Redis flushed under a waiting job,
//! then Redis killed. A name that no scrape shows fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::bins::Process;
use tokio::io::AsyncReadExt;

use crate::support::*;

/// The dashboard, parsed.
fn dashboard() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("contrib/grafana/thr-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// The thr metric names (`thr_…` identifiers) in a PromQL expression.
fn names_in(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(at) = expr[from..].find("thr_") {
        let start = from + at;
        let len = bytes[start..]
            .iter()
            .take_while(|b| is_name_byte(**b))
            .count();
        if start == 0 || !is_name_byte(bytes[start - 1]) {
            names.push(expr[start..start + len].to_string());
        }
        from = start + len;
    }
    names
}

/// Every thr metric name the dashboard queries, with where (for messages):
/// each panel's target expressions (rows' nested panels included) and each
/// template variable's query. Also checks that every panel queries
/// something, through the dashboard's data source variable.
fn queried(dashboard: &Value) -> BTreeMap<String, Vec<String>> {
    let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut found = |text: &str, place: String| {
        for name in names_in(text) {
            names.entry(name).or_default().push(place.clone());
        }
    };
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("a `panels` list")
        .iter()
        .collect();
    let mut charts = 0;
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        if panel["type"] == "row" {
            continue;
        }
        charts += 1;
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel `{title}` uses the data source variable"
        );
        let targets = panel["targets"].as_array().map(Vec::as_slice);
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel `{title}` has no targets"
        );
        for target in targets.unwrap_or_default() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of panel `{title}` has no `expr`"));
            found(expr, format!("panel `{title}`"));
        }
    }
    assert!(charts >= 10, "only {charts} panels");
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        let name = variable["name"].as_str().unwrap_or("?");
        // A query is text, or (newer Grafana) an object holding the text.
        for query in [
            &variable["query"],
            &variable["query"]["query"],
            &variable["definition"],
        ] {
            if let Some(text) = query.as_str() {
                found(text, format!("variable `{name}`"));
            }
        }
    }
    names
}

/// The metric names in `/metrics` texts: `# TYPE` lines give a name and its
/// kind, sample lines a series name.
#[derive(Default)]
struct Exposed {
    kinds: BTreeMap<String, String>,
    series: BTreeSet<String>,
}

impl Exposed {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    self.kinds.insert(name.to_string(), kind.to_string());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                self.series.insert(line[..end].to_string());
            }
        }
    }

    /// Whether a query for `name` finds series: a sample line has it, or it
    /// is a declared counter or gauge, or it is the `_bucket`, `_sum` or
    /// `_count` of a declared histogram. A histogram's bare name is not a
    /// series (Prometheus stores only the suffixed ones).
    fn has(&self, name: &str) -> bool {
        let kind = |n: &str| self.kinds.get(n).map(String::as_str);
        if self.series.contains(name) || kind(name).is_some_and(|k| k != "histogram") {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| kind(base) == Some("histogram"))
        })
    }
}

#[test]
fn names_are_read_from_queries_and_checked_against_expositions() {
    assert_eq!(
        names_in(
            "histogram_quantile(0.9, sum by (le) (rate(thr_backend_seconds_bucket{queue=~\"$queue\"}[5m]))) / xthr_no + thr_a:b"
        ),
        ["thr_backend_seconds_bucket", "thr_a:b"]
    );
    let mut exposed = Exposed::default();
    exposed.add(
        "# TYPE thr_requests_total counter\nthr_requests_total{queue=\"-\",status=\"403\"} 1\n\
         # TYPE thr_backend_seconds histogram\nthr_backend_seconds_bucket{le=\"0.1\"} 1\n\
         thr_backend_seconds_sum 0.01\nthr_backend_seconds_count 1\n",
    );
    for name in [
        "thr_requests_total",
        "thr_backend_seconds_bucket",
        "thr_backend_seconds_sum",
        "thr_backend_seconds_count",
    ] {
        assert!(exposed.has(name), "{name}");
    }
    for name in [
        "thr_backend_seconds",
        "thr_requests_total_bucket",
        "thr_requests",
        "thr_no_such_metric_total",
    ] {
        assert!(!exposed.has(name), "{name}");
    }
}

async fn scrape(port: u16) -> Option<String> {
    let seen = try_send(
        &client(),
        &format!("http://127.0.0.1:{port}"),
        &Req::new("GET", "/metrics"),
    )
    .await?;
    assert_eq!(seen.status, 200, "/metrics on port {port}");
    Some(String::from_utf8_lossy(&seen.body).into_owned())
}

/// Scrapes `port` until its `/metrics` shows `name`; returns that text.
async fn scrape_until(port: u16, name: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(text) = scrape(port).await {
            let mut exposed = Exposed::default();
            exposed.add(&text);
            if exposed.has(name) {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no {name} on port {port} after 15 s:\n{text}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no /metrics on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Jobs queue `default` has accepted since Redis started.
fn enqueued(redis: &RedisServer) -> u64 {
    let seq: Option<u64> = redis::cmd("GET")
        .arg(&keys("default").seq)
        .query(&mut redis.conn())
        .unwrap();
    seq.unwrap_or(0)
}

/// An edge limit on clients sending `X-Edge`, a limit of one running and two
/// waiting per `X-User`, a rule giving `/short` a 1.5 s reply timeout, a
/// short lease (a killed worker's job is taken back fast).
const EXTRA: &str = "lease = \"2s\"

[[limits]]
name = \"per_user\"
by = { header = \"X-User\" }
max_concurrent = 1
max_waiting = 2

[[rules]]
when = { path = { prefix = \"/short\" } }
then = { reply_timeout = \"1500ms\" }
";

/// `max_connections` of the front.
const MAX_CONNECTIONS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exposed() {
    testkit::init_logs();
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "thr-overview");
    assert_eq!(dashboard["title"], "thr");
    assert_eq!(dashboard["schemaVersion"], 39);
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    let queue = variable("queue");
    assert_eq!(
        queue["definition"],
        "label_values(thr_requests_total, queue)"
    );
    assert_eq!(queue["multi"], true);
    assert_eq!(queue["includeAll"], true);
    let wanted = queried(&dashboard);
    assert!(
        wanted.len() >= 20,
        "only {} names: {wanted:?}",
        wanted.len()
    );

    let mut redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let (port, front_admin, worker_admin) = (
        testkit::redis::free_port(),
        testkit::redis::free_port(),
        testkit::redis::free_port(),
    );
    let text = config_text(&redis.url(), &backend.url(), EXTRA)
        // Room for a job taken back from a killed worker, on a busy machine.
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"30s\"")
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!(
                "listen = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{front_admin}\"\nmax_connections = {MAX_CONNECTIONS}"
            ),
        )
        .replace(
            "[redis2http]",
            &format!(
                "[http2redis.edge_limit]\nby = {{ header = \"X-Edge\" }}\nrate = \"1/h\"\nburst = 1\n\n[redis2http]\nadmin = \"127.0.0.1:{worker_admin}\""
            ),
        );
    let (_dir, path) = config_file(&text);
    let _front = Process::spawn("http2redis", &["--config", &path]);
    let mut worker = Process::spawn("redis2http", &["--config", &path]);
    let url = format!("http://127.0.0.1:{port}");
    let client = client();
    let started = Instant::now();
    while try_send(&client, &url, &Req::new("GET", "/warm"))
        .await
        .is_none()
    {
        assert!(started.elapsed() < Duration::from_secs(15), "front not up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut scrapes = Vec::new();

    // Plain traffic, a backend error, an edge refusal (429).
    for i in 0..3 {
        assert_eq!(get(&url, &format!("/ok/{i}")).await.status, 200);
    }
    assert_eq!(get(&url, "/fail?status=500").await.status, 500);
    let edge = Req::new("GET", "/edge").header("x-edge", "abuser");
    assert_eq!(send(&client, &url, &edge).await.status, 200);
    assert_eq!(send(&client, &url, &edge).await.status, 429);

    // An upgrade request takes a tunnel slot (the backend declines it).
    let upgrade = Req::new("GET", "/ws")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    assert_ne!(send(&client, &url, &upgrade).await.status, 101);

    // Connections past max_connections: answered 503 and closed.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 8 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0;
    for stream in &mut idle {
        let mut head = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_millis(20), stream.read(&mut head)).await;
        if matches!(read, Ok(Ok(12))) && head.ends_with(b" 503") {
            refused += 1;
        }
    }
    assert!(refused > 0, "no connection refused past {MAX_CONNECTIONS}");
    drop(idle);
    // Their slots free again before the next clients come (a refused one
    // may see its connection reset, not the 503).
    let started = Instant::now();
    loop {
        let text = scrape(front_admin).await.expect("front metrics");
        let open = text
            .lines()
            .find_map(|l| l.strip_prefix("thr_connections_open "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if open.is_some_and(|n| n < 4.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "connections still open: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A full limit: one running, two waiting, the next refused (503); the
    // `/short` one times out waiting (504) and is withdrawn.
    let user = |target: &str| Req::new("GET", target).header("x-user", "u");
    let seq = enqueued(&redis);
    let running = spawn_send(&client, &url, user("/hold?delay=3000"));
    until_running(&backend, 1).await;
    let waiting = spawn_send(&client, &url, user("/waits"));
    until_enqueued(&redis, "default", seq + 2).await;
    let short = spawn_send(&client, &url, user("/short"));
    until_enqueued(&redis, "default", seq + 3).await;
    assert_eq!(send(&client, &url, &user("/full")).await.status, 503);
    assert_eq!(short.await.unwrap().status, 504);
    scrapes.push(scrape_until(worker_admin, "thr_quota_saturated_keys").await);
    assert_eq!(running.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);

    // A worker killed with a GET running: its successor takes the job back
    // once the lease has run out and runs it again.
    let before = backend.count();
    let retried = spawn_send(&client, &url, Req::new("GET", "/retried?delay=1000"));
    until(Duration::from_secs(10), "the GET running", || {
        backend.count() > before
    })
    .await;
    scrapes.push(scrape(worker_admin).await.expect("worker metrics"));
    worker.signal("KILL");
    worker.wait();
    let _worker = Process::spawn("redis2http", &["--config", &path]);
    scrapes.push(scrape_until(worker_admin, "thr_jobs_retried_total").await);
    assert_eq!(retried.await.unwrap().status, 200);

    // Redis loses its data under a waiting job: its client gets 503.
    let holder = |target: &str| Req::new("GET", target).header("x-user", "v");
    // (Counted by arrivals: the killed worker's call never ended, so the
    // backend counts it active for good.)
    let (seq, before) = (enqueued(&redis), backend.count());
    let _running = spawn_send(&client, &url, holder("/hold?delay=3000"));
    until(Duration::from_secs(10), "the holder running", || {
        backend.count() > before
    })
    .await;
    let lost = spawn_send(&client, &url, holder("/lost"));
    until_enqueued(&redis, "default", seq + 2).await;
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
    assert_eq!(lost.await.unwrap().status, 503);
    scrapes.push(scrape_until(front_admin, "thr_jobs_lost_total").await);

    // Redis gone: both daemons count failed calls.
    redis.kill();
    assert_eq!(get(&url, "/down").await.status, 503);
    scrapes.push(scrape_until(front_admin, "thr_redis_errors_total").await);
    scrapes.push(scrape_until(worker_admin, "thr_redis_errors_total").await);

    let mut exposed = Exposed::default();
    for text in &scrapes {
        exposed.add(text);
    }
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, _)| !exposed.has(name))
        .map(|(name, places)| format!("{name} (in {})", places.join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the daemons do not expose: {missing:#?}\n\
         exposed: {:?}",
        exposed.kinds.keys().collect::<Vec<_>>()
    );
}
