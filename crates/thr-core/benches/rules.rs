//! Cost of rule evaluation as rule sets grow: 10 and 200 rules mixing every
//! criterion kind, for a request that matches late and one that matches none.
//! Run: `cargo bench -p thr-core --bench rules`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use thr_core::config::Config;
use thr_core::rules::{RuleRequest, evaluate};

fn config(n: usize) -> Config {
    let mut text =
        String::from("[[queues]]\nname = \"default\"\nbackend = \"http://127.0.0.1:9000\"\n");
    for i in 0..n {
        let rule = match i % 6 {
            0 => format!(
                "when = {{ path = {{ prefix = \"/api/v{i}/\" }} }}\nthen = {{ priority = 10 }}"
            ),
            1 => format!(
                "when = {{ path = {{ glob = \"/reports/{i}/*\" }}, method = [\"GET\", \"HEAD\"] }}\nthen = {{ priority = 80 }}"
            ),
            2 => format!(
                "when = {{ header = {{ X-Tenant = \"tenant-{i}\" }} }}\nthen = {{ set_headers = {{ X-Tier = \"gold\" }} }}"
            ),
            3 => format!(
                "when = {{ path = {{ regex = \"^/item/{i}/[0-9]+$\" }} }}\nthen = {{ priority = 5 }}"
            ),
            4 => format!(
                "when = {{ remote_ip = {{ cidr = \"10.{}.0.0/16\" }} }}\nthen = {{ remove_headers = [\"X-Debug\"] }}",
                i % 256
            ),
            _ => format!(
                "when = {{ query = {{ format = \"csv{i}\" }}, host = \"h{i}.example\" }}\nthen = {{ priority = 90 }}"
            ),
        };
        text.push_str(&format!("[[rules]]\n{rule}\n"));
    }
    Config::parse(&text, "bench.toml").expect("bench config")
}

fn request(target: &str) -> RuleRequest {
    let mut headers = HeaderMap::new();
    headers.insert("host", "app.example".parse().unwrap());
    headers.insert("x-tenant", "tenant-none".parse().unwrap());
    headers.insert("user-agent", "bench/1.0".parse().unwrap());
    RuleRequest {
        method: Method::GET,
        target: target.to_string(),
        headers,
        remote_ip: Some("192.168.1.10".parse().unwrap()),
        real_ip: Some("192.168.1.10".parse().unwrap()),
    }
}

fn bench(c: &mut Criterion) {
    for n in [10, 200] {
        let cfg = config(n);
        let base = request("/orders/42?page=2&sort=desc");
        c.bench_function(&format!("evaluate {n} rules, none match"), |b| {
            b.iter(|| {
                let mut req = base.clone();
                black_box(evaluate(black_box(&cfg.rules), &mut req))
            })
        });
        let last = request(&format!("/api/v{}/x", (n - 1) / 6 * 6));
        c.bench_function(&format!("evaluate {n} rules, a late one matches"), |b| {
            b.iter(|| {
                let mut req = last.clone();
                black_box(evaluate(black_box(&cfg.rules), &mut req))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
