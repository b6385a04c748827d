use http::{HeaderMap, Method};

use super::*;
use crate::config::Config;

const QUEUES: &str = "[[queues]]\nname = \"default\"\nbackend = \"http://127.0.0.1:9000\"\n[[queues]]\nname = \"reports\"\nbackend = \"http://127.0.0.1:9001\"\n";

fn rules(text: &str) -> Config {
    Config::parse(&format!("{QUEUES}{text}"), "rules.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn errors(text: &str) -> String {
    Config::parse(&format!("{QUEUES}{text}"), "rules.toml")
        .unwrap_err()
        .to_string()
}

fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> RuleRequest {
    let mut map = HeaderMap::new();
    for (n, v) in headers {
        map.append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    RuleRequest {
        method: Method::from_bytes(method.as_bytes()).unwrap(),
        target: target.into(),
        headers: map,
        remote_ip: Some("10.1.2.3".parse().unwrap()),
        real_ip: Some("203.0.113.7".parse().unwrap()),
    }
}

fn decide(c: &Config, r: &mut RuleRequest) -> Decision {
    evaluate(&c.rules, r)
}

const ISSUE_EXAMPLE: &str = r#"
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

[[rules]]
when = { remote_ip = { cidr = "10.0.0.0/8" } }
then = { remove_headers = ["X-Internal-Debug"] }
"#;

#[test]
fn the_issue_example_works_verbatim() {
    let c = rules(ISSUE_EXAMPLE);
    assert_eq!(c.rules.len(), 4);

    let mut r = req("GET", "/forbidden", &[("x-priority", "high")]);
    let d = decide(&c, &mut r);
    let answer = d.answer.expect("direct answer");
    assert_eq!(answer.status, 403);
    assert_eq!(&answer.body[..], b"forbidden\n");
    assert_eq!(d.matched, [0], "stop = true ends evaluation");

    let mut r = req(
        "GET",
        "/reports/q1",
        &[("X-Priority", "high"), ("x-internal-debug", "1")],
    );
    let d = decide(&c, &mut r);
    assert_eq!(
        d.priority, 80,
        "the later rule overrides the earlier priority"
    );
    assert_eq!(d.matched, [1, 2, 3]);
    assert_eq!(r.headers["x-slow"], "yes");
    assert!(!r.headers.contains_key("x-internal-debug"));

    let mut r = req("POST", "/reports/q1", &[("x-priority", "high")]);
    let d = decide(&c, &mut r);
    assert_eq!(d.priority, 1);
    assert!(!r.headers.contains_key("x-slow"));

    let mut r = req("GET", "/other", &[]);
    r.remote_ip = Some("192.168.0.1".parse().unwrap());
    let d = decide(&c, &mut r);
    assert!(d.matched.is_empty());
    assert_eq!((d.queue, d.priority, d.bypass), (0, 50, false));
}

#[test]
fn empty_when_matches_everything() {
    let c = rules("[[rules]]\nthen = { priority = 7 }\n");
    assert_eq!(decide(&c, &mut req("DELETE", "/x?y", &[])).priority, 7);
}

#[test]
fn every_criterion_kind() {
    let c = rules(
        r#"
[[rules]]
name = "all"
when = { path = { prefix = "/api/" }, method = "PUT", host = { glob = "*.example.com" }, remote_ip = { cidr = "10.0.0.0/8" }, real_ip = "203.0.113.7", header = { Content-Type = { regex = "^application/json" } }, query = { v = ["1", "2"] } }
then = { queue = "reports" }
"#,
    );
    let good = || {
        req(
            "PUT",
            "/api/x?v=2",
            &[
                ("host", "API.example.com:8080"),
                ("content-type", "application/json; charset=utf-8"),
            ],
        )
    };
    assert_eq!(decide(&c, &mut good()).queue, 1);
    let mut variants = vec![];
    let mut r = good();
    r.target = "/web/x?v=2".into();
    variants.push(r);
    let mut r = good();
    r.method = Method::POST;
    variants.push(r);
    let mut r = good();
    r.headers.insert("host", "example.org".parse().unwrap());
    variants.push(r);
    let mut r = good();
    r.remote_ip = Some("192.168.1.1".parse().unwrap());
    variants.push(r);
    let mut r = good();
    r.real_ip = Some("203.0.113.8".parse().unwrap());
    variants.push(r);
    let mut r = good();
    r.headers
        .insert("content-type", "text/html".parse().unwrap());
    variants.push(r);
    let mut r = good();
    r.target = "/api/x?v=3".into();
    variants.push(r);
    for (i, mut r) in variants.into_iter().enumerate() {
        assert_eq!(decide(&c, &mut r).queue, 0, "variant {i} must not match");
    }
}

#[test]
fn headers_are_case_insensitive_and_missing_ones_match_only_absent() {
    let c = rules(
        r#"
[[rules]]
when = { header = { x-api-key = { absent = true } } }
then = { status = 401 }
[[rules]]
when = { header = { X-Mode = { not = "debug" } } }
then = { priority = 3 }
"#,
    );
    assert_eq!(
        decide(&c, &mut req("GET", "/", &[])).answer.unwrap().status,
        401
    );
    let d = decide(&c, &mut req("GET", "/", &[("X-API-KEY", "k")]));
    assert!(d.answer.is_none());
    assert_eq!(d.priority, 50, "`not` does not match a missing header");
    assert_eq!(
        decide(
            &c,
            &mut req("GET", "/", &[("x-api-key", "k"), ("x-mode", "fast")])
        )
        .priority,
        3
    );
    assert_eq!(
        decide(
            &c,
            &mut req("GET", "/", &[("x-api-key", "k"), ("x-mode", "debug")])
        )
        .priority,
        50
    );
    // Repeated header: any value may match.
    let c = rules(
        "[[rules]]\nwhen = { header = { Accept = \"text/csv\" } }\nthen = { priority = 9 }\n",
    );
    assert_eq!(
        decide(
            &c,
            &mut req(
                "GET",
                "/",
                &[("accept", "text/html"), ("accept", "text/csv")]
            )
        )
        .priority,
        9
    );
}

#[test]
fn query_criteria_use_decoded_values() {
    let c = rules(
        r#"
[[rules]]
when = { query = { q = "a b/c", missing = { absent = true } } }
then = { priority = 2 }
"#,
    );
    assert_eq!(decide(&c, &mut req("GET", "/s?q=a+b%2Fc", &[])).priority, 2);
    assert_eq!(
        decide(&c, &mut req("GET", "/s?q=a+b%2Fc&missing=", &[])).priority,
        50
    );
    assert_eq!(decide(&c, &mut req("GET", "/s", &[])).priority, 50);
}

#[test]
fn unix_clients_have_no_address() {
    let c = rules(
        "[[rules]]\nwhen = { remote_ip = { cidr = \"0.0.0.0/0\" } }\nthen = { priority = 2 }\n",
    );
    let mut r = req("GET", "/", &[]);
    r.remote_ip = None;
    assert_eq!(decide(&c, &mut r).priority, 50);
}

#[test]
fn request_rewrites() {
    let c = rules(
        r#"
[[rules]]
when = { path = { prefix = "/old/" } }
then = { path = { regex = "^/old/(.*)$", replace = "/new/$1" }, method = "POST", host = "backend.internal", set_query = { lang = "fr", "a b" = "c&d" }, remove_query = ["debug"], set_headers = { X-A = ["1", "2"] }, add_headers = { X-B = "3" }, remove_headers = ["Cookie"] }
[[rules]]
when = { path = { prefix = "/new/" } }
then = { add_headers = { X-B = "4" } }
"#,
    );
    let mut r = req(
        "GET",
        "/old/x/y?debug=1&lang=en&keep=%2F&lang=de",
        &[("cookie", "a=1"), ("x-a", "0"), ("host", "front")],
    );
    let d = decide(&c, &mut r);
    assert_eq!(d.matched, [0, 1], "the second rule sees the rewritten path");
    assert_eq!(r.target, "/new/x/y?keep=%2F&lang=fr&a+b=c%26d");
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.headers["host"], "backend.internal");
    let xa: Vec<_> = r.headers.get_all("x-a").iter().collect();
    assert_eq!(xa, ["1", "2"]);
    let xb: Vec<_> = r.headers.get_all("x-b").iter().collect();
    assert_eq!(xb, ["3", "4"]);
    assert!(!r.headers.contains_key("cookie"));

    let c = rules("[[rules]]\nthen = { path = \"/fixed\" }\n");
    let mut r = req("GET", "/any/thing?x=1", &[]);
    decide(&c, &mut r);
    assert_eq!(r.target, "/fixed?x=1");
}

#[test]
fn response_edits_and_answers_accumulate_in_order() {
    let c = rules(
        r#"
[[rules]]
then = { set_response_headers = { X-Frame-Options = "DENY", Server = "thr" }, default_body = "nothing here\n" }
[[rules]]
when = { path = "/api" }
then = { remove_response_headers = ["Server"], bypass = true }
[[rules]]
when = { path = "/health" }
then = { status = 200, body = "ok\n", headers = { Content-Type = "text/plain", Cache-Control = "no-store" } }
"#,
    );
    let d = decide(&c, &mut req("GET", "/api", &[]));
    assert!(d.bypass);
    assert_eq!(d.default_body.as_deref(), Some(&b"nothing here\n"[..]));
    let mut headers = HeaderMap::new();
    headers.insert("server", "apache".parse().unwrap());
    edit_response_headers(&mut headers, &d.response_headers);
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(
        !headers.contains_key("server"),
        "the later rule removed it again"
    );

    let d = decide(&c, &mut req("GET", "/health", &[]));
    let a = d.answer.unwrap();
    assert_eq!(a.headers.len(), 2);
    assert_eq!(&a.body[..], b"ok\n");
}

#[test]
fn queue_and_auth_actions() {
    let c = rules(
        r#"
[[rules]]
when = { path = { prefix = "/reports" } }
then = { queue = "reports", auth = { url = "http://auth.internal/check", forward_headers = ["Authorization", "Cookie"], copy_headers = ["X-User"], cache = "30s", timeout = "2s" } }
"#,
    );
    let d = decide(&c, &mut req("GET", "/reports/1", &[]));
    assert_eq!(d.queue, 1);
    let auth = d.auth.unwrap();
    assert_eq!(auth.url, "http://auth.internal/check");
    assert_eq!(auth.forward_headers, ["authorization", "cookie"]);
    assert_eq!(auth.copy_headers, ["x-user"]);
    assert_eq!(auth.cache, std::time::Duration::from_secs(30));
}

#[test]
fn rule_errors_name_their_key() {
    let e = errors(
        r#"
[[rules]]
when = { path = { regex = "(" }, header = { "Bad Name" = "x" } }
then = { queue = "nope", priority = 0, status = 42, method = "G T" }

[[rules]]
when = { method = { glob = "[" } }
then = { body = "x", path = "relative", auth = { url = "https://a" } }
"#,
    );
    for expected in [
        "rules.toml:9:17: `rules[0].when.path`", // line and column of the bad pattern
        "`rules[0].when.path`: invalid regex",
        "`rules[0].when.header.Bad Name`: `Bad Name` is not a valid header name",
        "`rules[0].then.queue`: no queue named `nope` (queues: default, reports)",
        "`rules[0].then.priority`: must be between 1",
        "`rules[0].then.status`: must be a status code",
        "`rules[0].then.method`: `G T` is not a method",
        "`rules[1].when.method`: invalid glob",
        "`rules[1].then.body`: `body` needs a `status`",
        "`rules[1].then.path`: expected a path starting with `/`",
        "`rules[1].then.auth.url`: `https://a` must be an http:// URL",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    let e = errors("[[rules]]\nwhen = { paht = \"/\" }\nthen = { priorty = 1 }\n");
    assert!(e.contains("`rules[0].when.paht`: unknown key"), "{e}");
    assert!(e.contains("`rules[0].then.priorty`: unknown key"), "{e}");
}

#[test]
fn trusted_proxies_parse() {
    let c = Config::parse(
        &format!("[http2redis]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]\n{QUEUES}"),
        "f.toml",
    )
    .unwrap();
    assert_eq!(c.front.trusted_proxies.len(), 2);
    let e = Config::parse(
        &format!("[http2redis]\ntrusted_proxies = [\"nope\"]\n{QUEUES}"),
        "f.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("`http2redis.trusted_proxies`"));
}
