//! The Lua quota arithmetic itself (`scripts/quota.lua`, the code every
//! claim runs), driven on a real Redis with a fake clock and checked against
//! a model: GCRA decisions equal `thr_core::quota::gcra`'s (whose bounds
//! are property-tested in thr-core), and a semaphore never admits more
//! than its maximum of unexpired holders.

use std::collections::HashMap;

use proptest::prelude::*;
use thr_broker::redis::scripts::QUOTA_LUA;
use thr_core::quota::gcra;

use crate::support::RedisServer;

/// Calls the functions of quota.lua with a clock given by the test.
const HARNESS: &str = r#"
local op = ARGV[1]
if op == 'gcra' then
  local now, interval, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local ok, v = gcra(KEYS[1], now, interval, burst)
  if ok then
    gcra_commit(KEYS[1], now, v, interval, burst)
    return {1, string.format('%.3f', v)}
  end
  return {0, string.format('%.3f', v)}
elseif op == 'acquire' then
  local now = tonumber(ARGV[2])
  if sem_room(KEYS[1], now, tonumber(ARGV[3])) then
    redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[5])), ARGV[4])
    return 1
  end
  return 0
elseif op == 'release' then
  return redis.call('ZREM', KEYS[1], ARGV[2])
end
"#;

fn script() -> redis::Script {
    redis::Script::new(&format!("{QUOTA_LUA}\n{HARNESS}"))
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
    let strategy = (
        proptest::collection::vec(0u32..300, 1..60),
        1u32..200,
        1u32..8,
    );
    let case = std::cell::Cell::new(0u64);
    runner()
        .run(&strategy, |(gaps, interval, burst)| {
            case.set(case.get() + 1);
            let case = case.get();
            let key = format!("thr:{{quota}}:gcra:prop-{case}");
            let mut now = 1_700_000_000_000.0f64;
            let mut tat = None;
            for gap in gaps {
                now += gap as f64;
                let (ok, value): (i64, String) = script
                    .key(&key)
                    .arg("gcra")
                    .arg(now)
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
fn lua_semaphore_never_exceeds_its_maximum() {
    let redis = RedisServer::start();
    let conn = std::cell::RefCell::new(redis.conn());
    let script = script();
    let strategy = (
        proptest::collection::vec((0u32..50, any::<bool>(), 0usize..6), 1..80),
        1u32..4,
        20u32..200,
    );
    let case = std::cell::Cell::new(0u64);
    runner()
        .run(&strategy, |(ops, max, lease)| {
            case.set(case.get() + 1);
            let case = case.get();
            let key = format!("thr:{{quota}}:sem:prop-{case}");
            let mut now = 1_700_000_000_000u64;
            // The model: holder -> lease deadline.
            let mut held: HashMap<usize, u64> = HashMap::new();
            for (gap, acquire, holder) in ops {
                now += gap as u64;
                held.retain(|_, until| *until > now);
                if acquire {
                    let got: i64 = script
                        .key(&key)
                        .arg("acquire")
                        .arg(now)
                        .arg(max)
                        .arg(format!("h{holder}"))
                        .arg(lease)
                        .invoke(&mut *conn.borrow_mut())
                        .unwrap();
                    prop_assert_eq!(
                        got == 1,
                        held.len() < max as usize,
                        "held={:?} now={}",
                        held,
                        now
                    );
                    if got == 1 {
                        held.insert(holder, now + lease as u64);
                    }
                } else {
                    let _: i64 = script
                        .key(&key)
                        .arg("release")
                        .arg(format!("h{holder}"))
                        .invoke(&mut *conn.borrow_mut())
                        .unwrap();
                    held.remove(&holder);
                }
                let live: usize = redis::cmd("ZCOUNT")
                    .arg(&key)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query(&mut *conn.borrow_mut())
                    .unwrap();
                prop_assert!(live <= max as usize, "{} live holders, max {}", live, max);
            }
            Ok(())
        })
        .unwrap();
}
