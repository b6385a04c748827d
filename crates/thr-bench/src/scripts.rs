//! The `scripts` scenario: the three job scripts alone, through the broker
//! but without HTTP, on a Redis that does nothing else. Rounds of 16 jobs
//! (`--script-jobs`) are enqueued at once (the broker batches them),
//! claimed by one call and answered at once (batched too); SLOWLOG logs
//! every call, so what each script costs Redis per job and per call is
//! measured inside Redis, free of the daemons' and the load generator's
//! noise. The figures to compare two versions of a script with; rounds of
//! one job tell a script's cost per call from its cost per job.

use std::time::Duration;

use futures_util::future::join_all;
use testkit::RedisServer;
use thr_broker::{Broker, ClaimOptions, ClaimOutcome, NewJob, RedisBroker};
use thr_core::envelope::{HeaderList, Job, JobMeta, Reply};
use thr_core::quota::Flow;

use crate::{bare, slowlog_start, slowlog_sums, slowlog_sums_of};

/// Rounds measured (after as many again to warm Redis up).
const ROUNDS: usize = 500;

/// Every job's priority.
pub(crate) const PRIORITY: u8 = 50;

/// The ids of round `round`'s `jobs` jobs.
pub(crate) fn round_ids(round: usize, jobs: usize) -> Vec<String> {
    (0..jobs)
        .map(|i| format!("{:032x}", round * jobs + i))
        .collect()
}

/// The reply to job `id`: a short page.
pub(crate) fn reply_frame(id: &str) -> bytes::Bytes {
    Reply::plain(id, 200, "a report of a few lines\n", "bench", &[])
}

/// A request as a browser sends it, in a job frame.
pub(crate) fn job_frame(id: &str) -> bytes::Bytes {
    let headers = [
        ("host", "app.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.5"),
        (
            "cookie",
            "sessionid=0123456789abcdef; csrftoken=fedcba9876543210",
        ),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
    ];
    let meta = JobMeta {
        id: id.to_string(),
        request_id: id.to_string(),
        queue: "bench".into(),
        priority: PRIORITY,
        front: String::new(),
        method: "GET".into(),
        target: "/reports/daily?page=2".into(),
        headers: HeaderList(
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
        ),
        timeout_ms: 60_000,
        flow: Flow::default().id(),
        flow_def: String::new(),
        body_chunks: 0,
        body_len: 0,
    };
    Job::encode(&meta, b"")
}

/// Enqueues, claims and answers `rounds` rounds of `jobs` jobs; returns
/// the jobs answered.
async fn run_rounds(broker: &RedisBroker, jobs: usize, rounds: usize, first: usize) -> usize {
    let flow = Flow::default();
    let mut answered = 0;
    for round in 0..rounds {
        let ids = round_ids(first + round, jobs);
        join_all(ids.iter().map(|id| {
            broker.enqueue(NewJob {
                queue: "bench",
                id,
                priority: PRIORITY,
                frame: job_frame(id),
                timeout: Duration::from_secs(60),
                flow: &flow,
                max_waiting: None,
                max_wait_boost: None,
                front: "",
                method: "GET",
            })
        }))
        .await
        .into_iter()
        .for_each(|r| {
            r.expect("enqueue");
        });
        let token = format!("round-{}", first + round);
        let options = ClaimOptions {
            token: &token,
            lease: Duration::from_secs(60),
            max_inflight_total: None,
            max_wait_boost: None,
            worker: "bench",
            max_jobs: jobs,
            retry_methods: &[],
            ahead: false,
        };
        let Ok(ClaimOutcome::Jobs(claimed)) = broker.claim("bench", options).await else {
            panic!("a round's jobs are claimed");
        };
        let replies = claimed
            .iter()
            .map(|c| broker.reply(&c.lease, reply_frame(c.id()), 3));
        answered += join_all(replies)
            .await
            .into_iter()
            .filter(|r| r.is_ok())
            .count();
    }
    answered
}

/// Runs the scenario and prints, per script, Redis's µs per job and per
/// call and the jobs per call, for rounds of `jobs_per_round` jobs; then
/// the same for the bare lifecycle ([`bare`]), the baseline measured in
/// the same run, and thr's cost as a multiple of it.
pub async fn scenario(jobs_per_round: usize) {
    println!(
        "\nscenario `scripts`: {ROUNDS} rounds of {jobs_per_round} jobs enqueued, claimed and answered, no HTTP, Redis idle otherwise"
    );
    let redis = RedisServer::start();
    let broker = RedisBroker::new(&redis.url(), Duration::from_secs(5)).expect("broker");
    run_rounds(&broker, jobs_per_round, ROUNDS, 0).await;
    slowlog_start(&redis);
    let jobs = run_rounds(&broker, jobs_per_round, ROUNDS, ROUNDS).await as f64;
    let (_, _, sums) = slowlog_sums(&redis);
    let thr = print_sums(&sums, jobs);
    let thr_port = redis.port();
    drop(redis);

    // The baseline, on a Redis of its own (so that a count of Redis's
    // instructions tells the two apart: scripts/redis-instructions.sh).
    let redis = RedisServer::start();
    let mut conn = bare::connect(&redis).await;
    bare::run_rounds(&mut conn, jobs_per_round, ROUNDS, 0).await;
    slowlog_start(&redis);
    let jobs = bare::run_rounds(&mut conn, jobs_per_round, ROUNDS, ROUNDS).await as f64;
    let (_, _, sums) = slowlog_sums_of(&redis, &bare::SCRIPTS);
    println!(
        "  the bare lifecycle (crates/thr-bench/bare: no flows, quotas, idempotency, hand-off or statistics), on a Redis of its own:"
    );
    let base = print_sums(&sums, jobs);
    println!(
        "  (SLOWLOG logging every call makes calls slower: compare runs, not with the load scenarios)\n  thr / bare: x{:.1} per job",
        thr / base.max(1e-9)
    );
    // What scripts/redis-instructions.sh reads to tell the two apart.
    println!(
        "  Redis ports: thr's scripts {thr_port}, the bare lifecycle {}",
        redis.port()
    );
}

/// Prints each script's figures and their total; returns the total µs per
/// job.
fn print_sums(sums: &[(&str, usize, i64)], jobs: f64) -> f64 {
    let mut total = 0.0;
    for &(name, calls, us) in sums {
        total += us as f64;
        println!(
            "  {name:<8} {:>6.1} µs per job   {:>6.1} µs per call   {:>5.1} jobs per call",
            us as f64 / jobs,
            us as f64 / calls.max(1) as f64,
            jobs / calls.max(1) as f64
        );
    }
    let per_job = total / jobs.max(1.0);
    println!("  all      {per_job:>6.1} µs per job");
    per_job
}
