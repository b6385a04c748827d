//! One function per subcommand. Read commands print text or, with
//! `--json`, one JSON document; actions print one line.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use thr_broker::redis::inspect::{DaemonInfo, QueueOverview, QuotaUsage};
use thr_core::config::Config;

use crate::table::{age, render};
use crate::{Command, Context, Failure};

/// Runs a command that needs Redis.
pub async fn dispatch(cx: &Context, command: Command) -> Result<(), Failure> {
    match command {
        Command::Status => status(cx).await,
        Command::Queues => queues(cx).await,
        Command::Queue {
            name,
            page,
            per_page,
        } => queue(cx, &name, page, per_page).await,
        Command::Running { name } => running(cx, name.as_deref()).await,
        Command::Limits => limits(cx).await,
        Command::Show { id, body } => show(cx, &id, body).await,
        Command::Purge {
            name,
            older_than,
            priority_above,
            yes,
        } => purge(cx, &name, older_than, priority_above, yes).await,
        Command::Pause { name } => pause(cx, &name, true).await,
        Command::Resume { name } => pause(cx, &name, false).await,
        Command::DeadLetters { name } => dead_letters(cx, name.as_deref()).await,
        Command::Retry { id } => retry(cx, &id).await,
        Command::Top => crate::top::run(cx).await,
        Command::CheckConfig { .. } | Command::Explain { .. } => {
            unreachable!("handled before connecting")
        }
    }
}

fn emit<T: Serialize>(cx: &Context, value: &T, text: impl FnOnce() -> String) {
    if cx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serializable")
        );
    } else {
        print!("{}", text());
    }
}

fn known(cx: &Context, name: &str) -> Result<(), Failure> {
    if cx.queues.iter().any(|q| q == name) {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "no queue named `{name}` (queues: {})",
            cx.queues.join(", ")
        )))
    }
}

fn by_priority(o: &QueueOverview) -> String {
    if o.waiting_by_priority.is_empty() {
        return "-".into();
    }
    o.waiting_by_priority
        .iter()
        .map(|(p, n)| format!("p{p}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Total latency percentiles over the last minute, `-` when idle.
fn latency(o: &QueueOverview) -> String {
    o.latency.as_ref().map_or("-".into(), |l| {
        format!(
            "{}/{}/{}",
            age(l.total_p50),
            age(l.total_p90),
            age(l.total_p99)
        )
    })
}

/// Column titles of a queue's line, in `status`, `queues` and `top`.
pub const QUEUE_COLUMNS: [&str; 7] = [
    "QUEUE",
    "WAITING",
    "RUNNING",
    "DRAIN",
    "OLDEST",
    "P50/P90/P99",
    "DEAD",
];

/// A queue's line under [`QUEUE_COLUMNS`].
pub fn queue_cells(o: &QueueOverview) -> Vec<String> {
    vec![
        o.name.clone() + if o.paused { " (paused)" } else { "" },
        o.waiting.to_string(),
        o.running.to_string(),
        format!("{:.1}/s", o.drain_per_second),
        o.oldest_waiting_ms.map_or("-".into(), age),
        latency(o),
        o.dead_letters.to_string(),
    ]
}

fn queue_rows(overviews: &[QueueOverview]) -> String {
    let rows: Vec<Vec<String>> = overviews
        .iter()
        .map(|o| {
            let mut cells = queue_cells(o);
            cells.push(by_priority(o));
            cells
        })
        .collect();
    let mut columns = QUEUE_COLUMNS.to_vec();
    columns.push("BY PRIORITY");
    render(&columns, &rows)
}

/// Every queue's overview.
pub async fn overviews(cx: &Context) -> Result<Vec<QueueOverview>, Failure> {
    let mut out = Vec::new();
    for q in &cx.queues {
        out.push(cx.broker.queue_overview(q).await?);
    }
    Ok(out)
}

/// Quotas whose running count reached their `max_concurrent`: the cap from
/// `--config` when given, else the one recorded with the jobs waiting for it.
pub fn saturated(config: Option<&Config>, usage: &[QuotaUsage]) -> Vec<QuotaUsage> {
    usage
        .iter()
        .filter(|u| {
            let max = match config {
                Some(config) => config
                    .limits
                    .iter()
                    .find(|l| l.name == u.limit)
                    .and_then(|l| l.max_concurrent)
                    .map(|m| m.get() as u64),
                None => u.max,
            };
            max.is_some_and(|max| u.running >= max)
        })
        .cloned()
        .collect()
}

fn daemon_rows(daemons: &[DaemonInfo]) -> String {
    let now = thr_broker::presence::unix_now();
    let rows: Vec<Vec<String>> = daemons
        .iter()
        .map(|d| {
            let field = |k: &str| {
                d.info
                    .get(k)
                    .map(|v| v.to_string().trim_matches('"').to_string())
                    .unwrap_or("-".into())
            };
            let uptime = d
                .info
                .get("started")
                .and_then(|s| s.as_u64())
                .map_or("-".into(), |s| age(now.saturating_sub(s) * 1000));
            let load = if d.kind == "http2redis" {
                format!("{} waiting", field("waiting"))
            } else {
                format!("{} running", field("inflight"))
            };
            vec![
                d.kind.clone(),
                d.id[..d.id.len().min(12)].to_string(),
                field("version"),
                uptime,
                load,
                age(d.seen_ms_ago),
            ]
        })
        .collect();
    render(
        &["DAEMON", "ID", "VERSION", "UPTIME", "LOAD", "SEEN"],
        &rows,
    )
}

#[derive(Serialize)]
struct Status {
    queues: Vec<QueueOverview>,
    daemons: Vec<DaemonInfo>,
    saturated_quotas: Vec<QuotaUsage>,
}

async fn status(cx: &Context) -> Result<(), Failure> {
    let status = Status {
        queues: overviews(cx).await?,
        daemons: cx.broker.daemons().await?,
        saturated_quotas: saturated(cx.config.as_ref(), &cx.broker.quota_usage().await?),
    };
    emit(cx, &status, || {
        let mut out = queue_rows(&status.queues);
        out.push('\n');
        out.push_str(&daemon_rows(&status.daemons));
        out.push('\n');
        if status.saturated_quotas.is_empty() {
            out.push_str("saturated quotas: none\n");
        } else {
            out.push_str("saturated quotas:\n");
            for q in &status.saturated_quotas {
                out.push_str(&format!(
                    "  {}={}  running {}  waiting {}\n",
                    q.limit, q.value, q.running, q.waiting
                ));
            }
        }
        out
    });
    Ok(())
}

async fn queues(cx: &Context) -> Result<(), Failure> {
    let all = overviews(cx).await?;
    emit(cx, &all, || queue_rows(&all));
    Ok(())
}

async fn queue(cx: &Context, name: &str, page: usize, per_page: usize) -> Result<(), Failure> {
    known(cx, name)?;
    let page = page.max(1);
    let jobs = cx
        .broker
        .waiting_jobs(name, (page - 1) * per_page, per_page)
        .await?;
    let overview = cx.broker.queue_overview(name).await?;
    emit(cx, &jobs, || {
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.method.clone(),
                    j.target.clone(),
                    j.priority.to_string(),
                    j.quotas.clone(),
                    age(j.age_ms),
                    j.front[..j.front.len().min(12)].to_string(),
                ]
            })
            .collect();
        let pages = (overview.waiting as usize).div_ceil(per_page).max(1);
        format!(
            "{}{} waiting, page {page}/{pages}\n",
            render(
                &["ID", "METHOD", "PATH", "PRIO", "QUOTAS", "AGE", "FRONT"],
                &rows
            ),
            overview.waiting
        )
    });
    Ok(())
}

async fn running(cx: &Context, name: Option<&str>) -> Result<(), Failure> {
    if let Some(n) = name {
        known(cx, n)?;
    }
    let mut jobs = Vec::new();
    for q in cx
        .queues
        .iter()
        .filter(|q| name.is_none_or(|n| n == q.as_str()))
    {
        jobs.extend(cx.broker.running_jobs(q).await?);
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.age_ms));
    emit(cx, &jobs, || {
        let backend = |q: &str| {
            cx.config
                .as_ref()
                .and_then(|c| c.queue(q))
                .map_or("-".to_string(), |q| q.backend.display.clone())
        };
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.queue.clone(),
                    j.worker[..j.worker.len().min(12)].to_string(),
                    backend(&j.queue),
                    j.method.clone(),
                    j.target.clone(),
                    age(j.age_ms),
                    if j.lease_left_ms >= 0 {
                        age(j.lease_left_ms as u64)
                    } else {
                        "expired".into()
                    },
                ]
            })
            .collect();
        render(
            &[
                "ID",
                "QUEUE",
                "WORKER",
                "BACKEND",
                "METHOD",
                "PATH",
                "AGE",
                "LEASE LEFT",
            ],
            &rows,
        )
    });
    Ok(())
}

async fn limits(cx: &Context) -> Result<(), Failure> {
    let usage = cx.broker.quota_usage().await?;
    emit(cx, &usage, || {
        let max = |u: &QuotaUsage| {
            cx.config
                .as_ref()
                .and_then(|c| c.limits.iter().find(|l| l.name == u.limit))
                .and_then(|l| l.max_concurrent)
                .map(|m| m.get() as u64)
                .or(u.max)
                .map_or("-".to_string(), |m| m.to_string())
        };
        let rows: Vec<Vec<String>> = usage
            .iter()
            .map(|u| {
                vec![
                    u.limit.clone(),
                    u.value.clone(),
                    format!("{}/{}", u.running, max(u)),
                    u.waiting.to_string(),
                    if u.rate_busy_ms > 0 {
                        format!("busy {}", age(u.rate_busy_ms))
                    } else {
                        "-".into()
                    },
                ]
            })
            .collect();
        render(&["LIMIT", "VALUE", "RUNNING/MAX", "WAITING", "RATE"], &rows)
    });
    Ok(())
}

async fn show(cx: &Context, id: &str, with_body: bool) -> Result<(), Failure> {
    let job = cx
        .broker
        .job(&cx.queues, id)
        .await?
        .ok_or_else(|| Failure::usage(format!("no job `{id}`")))?;
    if cx.json {
        let mut value = serde_json::to_value(&job).expect("serializable");
        if with_body {
            value["body"] =
                serde_json::Value::String(String::from_utf8_lossy(&job.body).into_owned());
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializable")
        );
        return Ok(());
    }
    let m = &job.meta;
    let s = |k: &str| {
        m.get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let mut out = format!(
        "job {id}\n  queue:    {} ({})\n  request:  {} {}\n  priority: {}\n  quotas:   {}\n  front:    {}\n  id:       {}\n  headers:\n",
        job.queue,
        job.state,
        s("method"),
        s("target"),
        s("priority"),
        s("flow"),
        s("front"),
        s("request_id")
    );
    if let Some(headers) = m.get("headers").and_then(|h| h.as_array()) {
        for h in headers {
            if let Some(pair) = h.as_array() {
                let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
                out.push_str(&format!("    {}: {}\n", text(&pair[0]), text(&pair[1])));
            }
        }
    }
    out.push_str(&format!("  body:     {} bytes\n", job.body_bytes));
    print!("{out}");
    if with_body {
        std::io::stdout()
            .write_all(&job.body)
            .map_err(|e| Failure {
                message: e.to_string(),
                code: 1,
            })?;
        println!();
    }
    Ok(())
}

async fn purge(
    cx: &Context,
    name: &str,
    older_than: Option<Duration>,
    priority_above: Option<u8>,
    yes: bool,
) -> Result<(), Failure> {
    known(cx, name)?;
    if !yes {
        let waiting = cx.broker.queue_overview(name).await?.waiting;
        eprint!("purge up to {waiting} waiting jobs of `{name}`? their clients get 503 [y/N] ");
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(Failure::usage("not purged"));
        }
    }
    let n = cx.broker.purge(name, older_than, priority_above).await?;
    emit(
        cx,
        &serde_json::json!({ "queue": name, "purged": n }),
        || format!("purged {n} waiting jobs of `{name}`\n"),
    );
    Ok(())
}

async fn pause(cx: &Context, name: &str, paused: bool) -> Result<(), Failure> {
    known(cx, name)?;
    cx.broker.set_paused(name, paused).await?;
    let what = if paused {
        "paused: workers stop claiming; clients keep waiting"
    } else {
        "resumed"
    };
    emit(
        cx,
        &serde_json::json!({ "queue": name, "paused": paused }),
        || format!("`{name}` {what}\n"),
    );
    Ok(())
}

async fn dead_letters(cx: &Context, name: Option<&str>) -> Result<(), Failure> {
    let queues: Vec<String> = match name {
        Some(n) => {
            known(cx, n)?;
            vec![n.to_string()]
        }
        None => cx.queues.clone(),
    };
    let dead = cx.broker.dead_letters(&queues).await?;
    emit(cx, &dead, || {
        let rows: Vec<Vec<String>> = dead
            .iter()
            .map(|d| {
                vec![
                    d.id.clone(),
                    d.queue.clone(),
                    d.method.clone().unwrap_or("?".into()),
                    d.target.clone().unwrap_or("?".into()),
                    d.reason.clone(),
                ]
            })
            .collect();
        render(&["ID", "QUEUE", "METHOD", "PATH", "REASON"], &rows)
    });
    Ok(())
}

async fn retry(cx: &Context, id: &str) -> Result<(), Failure> {
    let timeout = cx
        .config
        .as_ref()
        .map_or(Duration::from_secs(30), |c| c.front.reply_timeout);
    match cx.broker.retry_dead(&cx.queues, id, timeout).await? {
        Some(queue) => {
            emit(cx, &serde_json::json!({ "id": id, "queue": queue }), || {
                format!("job {id} is back on `{queue}`\n")
            });
            Ok(())
        }
        None => Err(Failure::usage(format!("no dead letter `{id}`"))),
    }
}

/// `thrctl check-config F`.
pub fn check_config(file: &Path) -> Result<(), Failure> {
    match Config::load(file) {
        Ok(c) => {
            println!(
                "{}: ok ({} queues, {} rules, {} limits)",
                file.display(),
                c.queues.len(),
                c.rules.len(),
                c.limits.len()
            );
            Ok(())
        }
        Err(errors) => {
            eprint!("{errors}");
            Err(Failure::usage(format!("{} is not valid", file.display())))
        }
    }
}

/// `thrctl explain`.
pub fn explain(
    config: &Config,
    method: &str,
    url: &str,
    headers: &[String],
) -> Result<(), Failure> {
    let probe = http2redis::explain::Probe {
        method: method.into(),
        url: url.into(),
        headers: headers.to_vec(),
        remote_ip: None,
    };
    let text = http2redis::explain::explain(config, &probe).map_err(Failure::usage)?;
    print!("{text}");
    Ok(())
}
