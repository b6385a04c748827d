//! The `scripts` scenario's baseline: a bare job lifecycle in three
//! scripts (`bare/*.lua`) that does only what any Redis job queue must: an
//! enqueue that orders jobs and keeps a small record (payloads stored in
//! the same transaction, as thr's), a claim that leases the most urgent
//! jobs to a token and returns their payloads, and a release that checks
//! the lease, pushes the reply and forgets the job. No flows, quotas,
//! idempotency, hand-off, liveness or statistics. Run with the same jobs,
//! payloads and replies as thr's scripts, on a Redis of its own, it tells
//! what thr's features cost Redis beyond a job's bare round.

use crate::scripts::{PRIORITY, job_frame, reply_frame, round_ids};
use redis::aio::MultiplexedConnection;
use testkit::RedisServer;

/// The three scripts, named as [`crate::slowlog_sums_of`] reports them.
pub const SCRIPTS: [(&str, &str); 3] = [
    ("enqueue", include_str!("../bare/enqueue.lua")),
    ("claim", include_str!("../bare/claim.lua")),
    ("release", include_str!("../bare/release.lua")),
];

/// Its keys, in a hash tag of their own.
fn key(name: &str) -> String {
    format!("bare:{{bench}}:{name}")
}

/// The `EVALSHA` of bare script `i` on `keys`.
fn evalsha(i: usize, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(redis::Script::new(SCRIPTS[i].1).get_hash())
        .arg(keys.len());
    for k in keys {
        cmd.arg(key(k));
    }
    cmd
}

/// Loads the scripts into `redis` and returns a connection to it.
pub async fn connect(redis: &RedisServer) -> MultiplexedConnection {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for (_, source) in SCRIPTS {
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(source)
            .query_async(&mut conn)
            .await
            .expect("load a bare script");
    }
    conn
}

/// Enqueues, claims and answers `rounds` rounds of `jobs` jobs, one call
/// of each script per round; returns the jobs answered.
pub async fn run_rounds(
    conn: &mut MultiplexedConnection,
    jobs: usize,
    rounds: usize,
    first: usize,
) -> usize {
    let mut answered = 0;
    for round in 0..rounds {
        let ids = round_ids(first + round, jobs);
        let mut store = redis::cmd("HSET");
        store.arg(key("jobs"));
        let mut enqueue = evalsha(0, &["pending", "info", "wake", "seq"]);
        for id in &ids {
            store.arg(id).arg(job_frame(id).as_ref());
            enqueue.arg(id).arg(PRIORITY);
        }
        let _: () = redis::pipe()
            .atomic()
            .add_command(store)
            .ignore()
            .add_command(enqueue)
            .ignore()
            .query_async(conn)
            .await
            .expect("bare enqueue");
        let mut claim = evalsha(1, &["pending", "jobs", "leases", "owners"]);
        claim.arg("token").arg(jobs);
        let claimed: Vec<Vec<u8>> = claim.query_async(conn).await.expect("bare claim");
        let mut release = evalsha(2, &["leases", "owners", "jobs", "info", "replies"]);
        release.arg("token");
        for id in claimed.iter().step_by(2) {
            let id = String::from_utf8_lossy(id);
            release.arg(id.as_ref()).arg(reply_frame(&id).as_ref());
        }
        let pushed: usize = release.query_async(conn).await.expect("bare release");
        answered += pushed;
        // Nobody pops the replies: they go (not an EVALSHA, so not counted).
        let _: () = redis::cmd("DEL")
            .arg(key("replies"))
            .query_async(conn)
            .await
            .expect("bare replies dropped");
    }
    answered
}
