use super::*;

const ISSUE_EXAMPLE: &str = r#"
[redis]
url = "redis://127.0.0.1:6379"

[http2redis]
listen = "127.0.0.1:8080"
reply_timeout = "30s"

[[queues]]
name = "default"
backend = "http://127.0.0.1:9000"
max_inflight = 64
"#;

#[test]
fn issue_example_parses_verbatim() {
    let c = Config::parse(ISSUE_EXAMPLE, "thr.toml").unwrap();
    assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
    assert_eq!(
        c.front.listen,
        ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
    );
    assert_eq!(c.front.reply_timeout, Duration::from_secs(30));
    assert_eq!(c.front.max_body, 100 << 20);
    assert_eq!(c.queues[0].response_buffer, 1 << 20);
    assert_eq!(c.queues[0].max_response, None);
    assert_eq!(c.front.client_write_timeout, Duration::from_secs(60));
    let q = c.default_queue();
    assert_eq!(q.name, "default");
    assert_eq!(q.max_inflight.get(), 64);
    assert_eq!(q.backend_timeout, Duration::from_secs(60));
    assert_eq!(
        q.backend.address,
        BackendAddress::Http {
            authority: "127.0.0.1:9000".into()
        }
    );
}

#[test]
fn every_error_is_reported_with_line_and_key() {
    let text = r#"
[redis]
url = "http://nope"

[http2redis]
listen = "127.0.0.1:8080"
reply_timout = "30s"
max_body = "ten"

[[queues]]
name = "default"
bakend = "http://127.0.0.1:9000"
max_inflight = 0
"#;
    let errs = Config::parse(text, "bad.toml").unwrap_err();
    let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let joined = lines.join("\n");
    assert!(joined.contains("bad.toml:3:7: `redis.url`"), "{joined}");
    assert!(
        joined.contains("bad.toml:7:1: `http2redis.reply_timout`: unknown key"),
        "{joined}"
    );
    assert!(
        joined.contains("bad.toml:8:12: `http2redis.max_body`"),
        "{joined}"
    );
    assert!(
        joined.contains("bad.toml:12:1: `queues[0].bakend`: unknown key"),
        "{joined}"
    );
    assert!(
        joined.contains("bad.toml:13:16: `queues[0].max_inflight`"),
        "{joined}"
    );
    // queues[0].backend is missing too: the error points at the queue's table.
    assert!(
        joined.contains("`queues[0].backend`: is required"),
        "{joined}"
    );
}

#[test]
fn unknown_keys_are_all_reported_without_other_errors() {
    let text = "[redis]\nurl = \"redis://x\"\nfoo = 1\n[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\nbar = 2\n";
    let errs = Config::parse(text, "f.toml").unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["redis.foo", "queues[0].bar"]);
    assert_eq!(errs.0[0].line, Some(3));
    assert_eq!(errs.0[1].line, Some(7));
}

#[test]
fn type_errors_name_the_key() {
    let text = "[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\nmax_inflight = \"many\"\n";
    let errs = Config::parse(text, "f.toml").unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].key, "queues[0].max_inflight");
    assert_eq!(errs.0[0].line, Some(4));
}

#[test]
fn syntax_errors_have_a_line() {
    let errs = Config::parse("[redis\nurl = 1\n", "f.toml").unwrap_err();
    assert_eq!(errs.0[0].line, Some(1), "{errs}");
}

#[test]
fn no_queue_is_an_error() {
    let errs = Config::parse("", "f.toml").unwrap_err();
    assert!(errs.to_string().contains("no [[queues]]"));
}

#[test]
fn duplicate_and_invalid_queue_names() {
    let text = "[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\n[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\n[[queues]]\nname = \"a}:b{\"\nbackend = \"http://h:1\"\n";
    let errs = Config::parse(text, "f.toml").unwrap_err();
    let joined = errs.to_string();
    assert!(
        joined.contains("f.toml:5:8: `queues[1].name`: queue `a` is defined twice"),
        "{joined}"
    );
    assert!(
        joined.contains("`queues[2].name`: `a}:b{` is not a valid queue name"),
        "{joined}"
    );
}

#[test]
fn unix_sockets_everywhere() {
    let text = r#"
[redis]
url = "redis+unix:///run/redis.sock"
[http2redis]
listen = "unix:/run/thr.sock"
[[queues]]
name = "legacy"
backend = "unix:/run/app.sock"
"#;
    let c = Config::parse(text, "f.toml").unwrap();
    assert_eq!(c.front.listen, ListenAddr::Unix("/run/thr.sock".into()));
    assert_eq!(
        c.queues[0].backend.address,
        BackendAddress::Unix("/run/app.sock".into())
    );
    assert_eq!(c.redis.url, "redis+unix:///run/redis.sock");
}

#[test]
fn backend_urls() {
    use compile::parse_backend;
    let b = parse_backend("http://app.internal/base/").unwrap();
    assert_eq!(
        b.address,
        BackendAddress::Http {
            authority: "app.internal:80".into()
        }
    );
    assert_eq!(b.base_path, "/base");
    assert!(parse_backend("https://x").is_err());
    assert!(parse_backend("ftp://x").is_err());
    assert!(parse_backend("http://u:p@x").is_err());
    assert!(parse_backend("unix:").is_err());
}

const THR_EXAMPLE: &str = r#"
[[limits]]
name = "foo_bar"
by = { header = "Foo" }
when = "bar"
max_concurrent = 2

[[limits]]
name = "per_user"
by = { header = "X-User" }
max_concurrent = 4
rate = "20/s"
burst = 5
"#;

#[test]
fn the_thr_limits_example_parses_verbatim() {
    use crate::quota::{Flow, KeySource};
    use crate::rules::RuleRequest;
    let c = Config::parse(&format!("{ISSUE_EXAMPLE}{THR_EXAMPLE}"), "thr.toml").unwrap();
    assert_eq!(c.limits.len(), 2);
    assert_eq!(c.limits[0].by, KeySource::Header("foo".parse().unwrap()));
    assert_eq!(c.limits[0].max_concurrent.map(|n| n.get()), Some(2));
    let rate = c.limits[1].rate.unwrap();
    assert_eq!((rate.interval_ms(), rate.burst.get()), (50.0, 5));

    let req = |pairs: &[(&str, &str)]| {
        let mut headers = http::HeaderMap::new();
        for (n, v) in pairs {
            headers.insert(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        RuleRequest {
            method: http::Method::GET,
            target: "/".into(),
            headers,
            remote_ip: None,
            real_ip: None,
        }
    };
    let bar = Flow::of(&c.limits, 0, &req(&[("Foo", "bar"), ("X-User", "al ice")]));
    assert_eq!(bar.id(), "foo_bar=bar&per_user=al%20ice");
    let caps: Vec<_> = bar
        .quotas
        .iter()
        .map(|q| (q.max_concurrent, q.interval_ms, q.burst))
        .collect();
    assert_eq!(caps, [(2, 0.0, 0), (4, 50.0, 5)]);
    let baz = Flow::of(&c.limits, 0, &req(&[("Foo", "baz")]));
    assert_eq!(baz.id(), "-", "`when` did not match and there is no X-User");
    // Values cannot inject into key names.
    let evil = Flow::of(&c.limits, 0, &req(&[("X-User", "a}:b{")]));
    assert_eq!(evil.id(), "per_user=a%7D%3Ab%7B");
}

#[test]
fn limit_scheduling_and_edge_errors() {
    let text = format!(
        "{ISSUE_EXAMPLE}[http2redis.edge_limit]\nrate = \"fast\"\n[scheduling]\nmax_wait_boost = \"0s\"\n[[limits]]\nname = \"a b\"\nby = \"cookie\"\nrate = \"5/s\"\nburst = 0\nqueue = \"nope\"\n[[limits]]\nby = \"path\"\n[[queues]]\nname = \"q2\"\nbackend = \"http://h:1\"\nmax_waiting = 0\n"
    );
    let e = Config::parse(&text, "f.toml").unwrap_err().to_string();
    for expected in [
        "`http2redis.edge_limit.rate`: `fast` is not a rate",
        "`scheduling.max_wait_boost`: must be longer than zero",
        "`limits[0].name`: `a b` is not a valid limit name",
        "`limits[0].by`: unknown key `cookie`",
        "`limits[0].burst`: must be a whole number of at least 1",
        "`limits[0].queue`: no queue named `nope`",
        "`limits[1].name`: is required",
        "`queues[1].max_waiting`: must be a whole number of at least 1",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    let ok = Config::parse(
        &format!("{ISSUE_EXAMPLE}[http2redis.edge_limit]\nby = \"real_ip\"\nrate = \"50/s\"\nburst = 100\n[scheduling]\nmax_wait_boost = \"30s\"\n"),
        "f.toml",
    )
    .unwrap();
    let edge = ok.front.edge_limit.unwrap();
    assert_eq!(edge.rate.burst.get(), 100);
    assert_eq!(ok.scheduling.max_wait_boost, Some(Duration::from_secs(30)));
}

#[test]
fn max_tunnels_defaults_to_100_and_zero_refuses_upgrades() {
    let c = Config::parse(ISSUE_EXAMPLE, "thr.toml").unwrap();
    assert_eq!(c.default_queue().max_tunnels, 100);
    let text = format!(
        "{ISSUE_EXAMPLE}max_tunnels = 0\n[[queues]]\nname = \"ws\"\nbackend = \"http://h:1\"\nmax_tunnels = 5\n"
    );
    let c = Config::parse(&text, "thr.toml").unwrap();
    assert_eq!(c.queues[0].max_tunnels, 0);
    assert_eq!(c.queues[1].max_tunnels, 5);
}

#[test]
fn max_tunnels_errors_name_the_key() {
    let typo = "[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\nmax_tunels = 3\n";
    let errs = Config::parse(typo, "f.toml").unwrap_err();
    assert_eq!(
        errs.to_string().trim(),
        "1 error in configuration:\n  f.toml:4:1: `queues[0].max_tunels`: unknown key"
    );
    let wrong_type = "[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\nmax_tunnels = \"lots\"\n";
    let errs = Config::parse(wrong_type, "f.toml").unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].key, "queues[0].max_tunnels");
    assert_eq!(errs.0[0].line, Some(4));
    let out_of_range = "[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\nmax_tunnels = -1\n[[queues]]\nname = \"b\"\nbackend = \"http://h:1\"\nmax_tunnels = 100001\n";
    let joined = Config::parse(out_of_range, "f.toml")
        .unwrap_err()
        .to_string();
    for expected in [
        "f.toml:4:15: `queues[0].max_tunnels`: must be between 0 and 100000",
        "f.toml:8:15: `queues[1].max_tunnels`: must be between 0 and 100000",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
}

#[test]
fn runtime_threads_default_to_one_and_zero_means_per_core() {
    let c = Config::parse(ISSUE_EXAMPLE, "thr.toml").unwrap();
    assert_eq!((c.front.threads, c.worker.threads), (1, 1));
    let text = ISSUE_EXAMPLE.replace(
        "[http2redis]\n",
        "[redis2http]\nthreads = 0\n[http2redis]\nthreads = 4\n",
    );
    let c = Config::parse(&text, "thr.toml").unwrap();
    assert_eq!((c.front.threads, c.worker.threads), (4, 0));
    let wrong = "[http2redis]\nthreads = -2\n[[queues]]\nname = \"a\"\nbackend = \"http://h:1\"\n";
    let errs = Config::parse(wrong, "f.toml").unwrap_err().to_string();
    assert!(
        errs.contains(
            "f.toml:2:11: `http2redis.threads`: must be between 0 (one per CPU core) and 1024"
        ),
        "{errs}"
    );
}

#[test]
fn every_type_error_is_reported_at_once_with_the_quoted_form_to_write() {
    let text = r#"
[http2redis]
reply_timeout = 30
max_headers = "many"
body_read_timeout = 30

[[queues]]
name = 7
backend = "http://127.0.0.1:9000"
max_inflight = "64"
lease = 5
bakend = "x"
"#;
    let errs = Config::parse(text, "bad.toml").unwrap_err();
    let joined = errs.to_string();
    for expected in [
        "bad.toml:3:17: `http2redis.reply_timeout`: invalid type: integer `30`, expected a string; write \"30s\"",
        "bad.toml:4:15: `http2redis.max_headers`",
        "bad.toml:5:21: `http2redis.body_read_timeout`: invalid type: integer `30`, expected a string; write \"30s\"",
        "bad.toml:8:8: `queues[0].name`",
        "bad.toml:10:16: `queues[0].max_inflight`",
        "bad.toml:11:9: `queues[0].lease`: invalid type: integer `5`, expected a string; write \"5s\"",
        "bad.toml:12:1: `queues[0].bakend`: unknown key",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
    // The left-out name is not reported again as missing.
    assert_eq!(errs.0.len(), 7, "{joined}");
}
