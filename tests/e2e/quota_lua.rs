//! The Lua quota arithmetic itself (`scripts/lib/quota.lua`, the code every
//! claim runs), driven on a real Redis with a fake clock and checked against
//! a model: GCRA decisions equal `thr_core::quota::gcra`'s (whose bounds
//! are property-tested in thr-core), a swept GCRA state decides as if it
//! were kept, and a semaphore never admits more than its maximum of
//! unexpired holders while its counts heal as holders expire.

use std::collections::HashMap;

use proptest::prelude::*;
use thr_broker::protocol::lua_helper;
use thr_core::quota::gcra;

use crate::support::RedisServer;

/// Calls the functions of quota.lua with a clock given by the test, the way
/// the claim script does (sweep, decide, commit). KEYS: held, holders,
/// gcra, gcra_expiry.
const HARNESS: &str = r#"
local held, holders, state, expiry = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, now = ARGV[1], tonumber(ARGV[2])
if op == 'gcra' then
  local token, interval, burst = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  gcra_sweep(state, expiry, now)
  local ok, v = gcra(state, token, now, interval, burst)
  if ok then
    gcra_commit(state, expiry, token, now, v, interval, burst)
    return {1, string.format('%.3f', v)}
  end
  return {0, string.format('%.3f', v)}
elseif op == 'acquire' then
  local token, max, id, lease = ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
  sem_sweep(held, holders, now)
  if sem_room(held, token, max) then
    sem_take(held, holders, token, id, int(now + lease))
    return 1
  end
  return 0
elseif op == 'release' then
  local token, id = ARGV[3], ARGV[4]
  sem_drop(held, holders, token, id)
  return 1
end
return redis.error_reply('unknown op ' .. op)
"#;

fn script() -> redis::Script {
    let clock = lua_helper("clock").expect("lib/clock.lua");
    let quota = lua_helper("quota").expect("lib/quota.lua");
    redis::Script::new(&format!("{clock}\n{quota}\n{HARNESS}"))
}

/// The four quota keys of test case `case` (one hash tag, like the broker's).
fn keys(case: u64) -> [String; 4] {
    ["held", "holders", "gcra", "gcra-expiry"].map(|k| format!("thr:{{quota-{case}}}:{k}"))
}

fn runner() -> proptest::test_runner::TestRunner {
    proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    })
}

#[test]
fn lua_gcra_decides_like_the_model() {
    let redis = RedisServer::start();
    let conn = std::cell::RefCell::new(redis.conn());
    let script = script();
    // Mostly short gaps (bursts, refusals), some long ones (the state is
    // swept, and must decide as if it had been kept).
    let gap = prop_oneof![4 => 0u32..300, 1 => 1_000u32..5_000];
    let strategy = (proptest::collection::vec(gap, 1..60), 1u32..200, 1u32..8);
    let case = std::cell::Cell::new(0u64);
    runner()
        .run(&strategy, |(gaps, interval, burst)| {
            case.set(case.get() + 1);
            let keys = keys(case.get());
            let mut now = 1_700_000_000_000.0f64;
            let mut tat = None;
            for gap in gaps {
                now += gap as f64;
                let (ok, value): (i64, String) = script
                    .key(&keys[0])
                    .key(&keys[1])
                    .key(&keys[2])
                    .key(&keys[3])
                    .arg("gcra")
                    .arg(now)
                    .arg("user=alice")
                    .arg(interval)
                    .arg(burst)
                    .invoke(&mut *conn.borrow_mut())
                    .unwrap();
                let value: f64 = value.parse().unwrap();
                match gcra(tat, now, interval as f64, burst) {
                    Ok(new_tat) => {
                        prop_assert_eq!(ok, 1, "Lua refused what the model allows at {}", now);
                        prop_assert!((value - new_tat).abs() < 0.01);
                        tat = Some(new_tat);
                    }
                    Err(wait) => {
                        prop_assert_eq!(ok, 0, "Lua allowed what the model refuses at {}", now);
                        prop_assert!((value - wait).abs() < 0.01);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn lua_gcra_state_is_forgotten_once_the_bucket_is_full_again() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let script = script();
    let keys = keys(0);
    let call = |conn: &mut redis::Connection, token: &str, now: f64| -> i64 {
        let (ok, _): (i64, String) = script
            .key(&keys[0])
            .key(&keys[1])
            .key(&keys[2])
            .key(&keys[3])
            .arg("gcra")
            .arg(now)
            .arg(token)
            .arg(100)
            .arg(2)
            .invoke(conn)
            .unwrap();
        ok
    };
    let state = |conn: &mut redis::Connection, token: &str| -> Option<String> {
        redis::cmd("HGET")
            .arg(&keys[2])
            .arg(token)
            .query(conn)
            .unwrap()
    };
    let t0 = 1_700_000_000_000.0;
    assert_eq!(call(&mut conn, "ip=a", t0), 1);
    assert_eq!(call(&mut conn, "ip=a", t0), 1);
    assert_eq!(call(&mut conn, "ip=a", t0), 0, "a burst of 2");
    // Its tat is t0 + 200: the bucket is full again then, and the state is
    // kept one more second.
    assert_eq!(call(&mut conn, "ip=b", t0 + 1_300.0), 1);
    assert!(state(&mut conn, "ip=a").is_some(), "kept while it matters");
    assert_eq!(call(&mut conn, "ip=b", t0 + 1_500.0), 1);
    assert_eq!(
        state(&mut conn, "ip=a"),
        None,
        "swept once it no longer does"
    );
    let (states, expiries): (u64, u64) = redis::pipe()
        .hlen(&keys[2])
        .zcard(&keys[3])
        .query(&mut conn)
        .unwrap();
    assert_eq!((states, expiries), (1, 1), "only ip=b's state is left");
    // A forgotten state decides like a kept one: a full burst.
    assert_eq!(call(&mut conn, "ip=a", t0 + 1_500.0), 1);
    assert_eq!(call(&mut conn, "ip=a", t0 + 1_500.0), 1);
    assert_eq!(call(&mut conn, "ip=a", t0 + 1_500.0), 0);
}

#[test]
fn lua_semaphore_never_exceeds_its_maximum() {
    let redis = RedisServer::start();
    let conn = std::cell::RefCell::new(redis.conn());
    let script = script();
    let strategy = (
        proptest::collection::vec((0u32..50, any::<bool>(), 0usize..6), 1..80),
        1u32..4,
        20u32..200,
    );
    let token = "tenant=a";
    let case = std::cell::Cell::new(0u64);
    runner()
        .run(&strategy, |(ops, max, lease)| {
            case.set(case.get() + 1);
            let keys = keys(case.get());
            let mut now = 1_700_000_000_000u64;
            // The model: holder -> lease deadline.
            let mut model: HashMap<usize, u64> = HashMap::new();
            for (gap, acquire, holder) in ops {
                now += gap as u64;
                model.retain(|_, until| *until > now);
                let mut c = conn.borrow_mut();
                if acquire {
                    let got: i64 = script
                        .key(&keys[0])
                        .key(&keys[1])
                        .key(&keys[2])
                        .key(&keys[3])
                        .arg("acquire")
                        .arg(now)
                        .arg(token)
                        .arg(max)
                        .arg(format!("h{holder}"))
                        .arg(lease)
                        .invoke(&mut *c)
                        .unwrap();
                    prop_assert_eq!(
                        got == 1,
                        model.len() < max as usize,
                        "model={:?} now={}",
                        model,
                        now
                    );
                    if got == 1 {
                        model.insert(holder, now + lease as u64);
                    }
                } else {
                    let _: i64 = script
                        .key(&keys[0])
                        .key(&keys[1])
                        .key(&keys[2])
                        .key(&keys[3])
                        .arg("release")
                        .arg(now)
                        .arg(token)
                        .arg(format!("h{holder}"))
                        .invoke(&mut *c)
                        .unwrap();
                    model.remove(&holder);
                }
                let (live, members, count): (usize, usize, Option<usize>) = redis::pipe()
                    .cmd("ZCOUNT")
                    .arg(&keys[1])
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .zcard(&keys[1])
                    .hget(&keys[0], token)
                    .query(&mut *c)
                    .unwrap();
                prop_assert!(live <= max as usize, "{} live holders, max {}", live, max);
                // `held` counts exactly the holders not yet swept: the
                // count heals with them, never drifts.
                prop_assert_eq!(count.unwrap_or(0), members, "held vs holders at {}", now);
            }
            Ok(())
        })
        .unwrap();
}
