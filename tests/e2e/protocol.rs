//! The broker protocol's two sides agree (`thr_broker::protocol`): records
//! written by Rust read the same in Lua (`scripts/lib/records.lua`) and the
//! reverse, flow members and order scores are built alike, and every
//! script the broker runs loads on a real Redis.

use std::path::Path;

use thr_broker::protocol::records::{FlowDef, JobInfo, Owner, flow_member};
use thr_broker::protocol::{lua_helper, script_source};
use thr_core::priority;
use thr_core::quota::{Flow, QuotaKey};

use crate::support::RedisServer;

/// Reads and writes records with the Lua helpers. Every number goes back
/// as text (`%.17g`: exact), since Redis would truncate a Lua number.
const HARNESS: &str = r#"
local op = ARGV[1]
local function num(x)
  return string.format('%.17g', x)
end
if op == 'info' then
  local i = info_unpack(ARGV[2])
  if not i then
    return {}
  end
  return {num(i.prio), num(i.score), i.flow, num(i.enqueued), num(i.deadline), i.front, i.method,
    num(i.attempts), i.def}
elseif op == 'pack' then
  return info_pack({
    prio = tonumber(ARGV[2]), score = tonumber(ARGV[3]), flow = ARGV[4],
    enqueued = tonumber(ARGV[5]), deadline = tonumber(ARGV[6]), front = ARGV[7],
    method = ARGV[8], attempts = tonumber(ARGV[9]), def = ARGV[10],
  })
elseif op == 'owner' then
  local o = owner_unpack(ARGV[2])
  if not o then
    return {}
  end
  return {o.worker, o.token, num(o.claimed), o.streaming and 's' or '-', owner_pack(o)}
elseif op == 'def' then
  local out = {}
  for _, q in ipairs(parse_def(ARGV[2])) do
    out[#out + 1] = q.token
    out[#out + 1] = num(q.max)
    out[#out + 1] = num(q.interval)
    out[#out + 1] = num(q.burst)
    out[#out + 1] = num(q.maxw)
  end
  return out
elseif op == 'member' then
  return flow_member(ARGV[2], tonumber(ARGV[3]), ARGV[4])
elseif op == 'score' then
  return num(order_score(tonumber(ARGV[2]), tonumber(ARGV[3]), 0, 0))
elseif op == 'head' then
  return flow_head(KEYS[1], ARGV[2]) or ''
end
return redis.error_reply('unknown op ' .. op)
"#;

fn script() -> redis::Script {
    let helpers: Vec<&str> = ["clock", "order", "records"]
        .iter()
        .map(|h| lua_helper(h).unwrap_or_else(|| panic!("lib/{h}.lua")))
        .collect();
    redis::Script::new(&format!("{}\n{HARNESS}", helpers.join("\n")))
}

fn infos() -> Vec<JobInfo> {
    let max_score = priority::score(priority::LOWEST, priority::SEQUENCE_SPACE - 1);
    vec![
        JobInfo {
            priority: 7,
            score: priority::score(7, 12),
            flow: "user=alice&ip=1.2.3.4".into(),
            enqueued_ms: 1_700_000_000_123,
            deadline_ms: 1_700_000_030_123,
            front: "f-3b2c".into(),
            method: "POST".into(),
            attempts: 2,
            flow_def: "user=alice 1 0 0 0;ip=1.2.3.4 0 100 5 0".into(),
        },
        // A job of no quota, and no front waiting (a dead letter retried).
        JobInfo {
            priority: 99,
            score: max_score,
            flow: "-".into(),
            enqueued_ms: 0,
            deadline_ms: 1,
            front: String::new(),
            method: "GET".into(),
            attempts: 0,
            flow_def: String::new(),
        },
        // An aging score: (now + 98 steps) · 1024 + sequence.
        JobInfo {
            priority: 1,
            score: (1_700_000_000_000 + 98 * 1_000) * 1024 + 1023,
            flow: "path=%2Fapi%2Fv1&#0123456789abcdef0123456789abcdef01234567".into(),
            enqueued_ms: 1_700_000_000_000,
            deadline_ms: 1_700_003_600_000,
            front: "front-1".into(),
            method: "PURGE".into(),
            attempts: 41,
            flow_def: "path=%2Fapi%2Fv1 3 333.3333333333333 10 100".into(),
        },
    ]
}

#[test]
fn lua_and_rust_read_records_alike() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let script = script();

    // JobInfo: Rust writes, Lua reads; Lua writes, Rust reads.
    for info in infos() {
        let text = info.encode();
        let read: Vec<String> = script.arg("info").arg(&text).invoke(&mut conn).unwrap();
        let expected = [
            info.priority.to_string(),
            info.score.to_string(),
            info.flow.clone(),
            info.enqueued_ms.to_string(),
            info.deadline_ms.to_string(),
            info.front.clone(),
            info.method.clone(),
            info.attempts.to_string(),
            info.flow_def.clone(),
        ];
        assert_eq!(read, expected, "Lua's reading of {text:?}");
        let packed: Vec<u8> = script
            .arg("pack")
            .arg(info.priority)
            .arg(info.score)
            .arg(&info.flow)
            .arg(info.enqueued_ms)
            .arg(info.deadline_ms)
            .arg(&info.front)
            .arg(&info.method)
            .arg(info.attempts)
            .arg(&info.flow_def)
            .invoke(&mut conn)
            .unwrap();
        assert_eq!(packed, text, "Lua's info_pack writes what Rust does");
        assert_eq!(JobInfo::decode(&packed).as_ref(), Some(&info));
    }
    // Not a record of this version (version 2 was text): Lua refuses it
    // like Rust.
    let old = "2\t50\t1\t-\t0\t0\tf\tGET\t0\t";
    assert_eq!(JobInfo::decode(old.as_bytes()), None);
    let read: Vec<String> = script.arg("info").arg(old).invoke(&mut conn).unwrap();
    assert!(read.is_empty(), "Lua read an old record: {read:?}");

    // Owner.
    let owner = Owner {
        worker: "w-9f".into(),
        token: "claim-42".into(),
        claimed_ms: 1_700_000_000_999,
        streaming: false,
    };
    for owner in [
        owner.clone(),
        Owner {
            streaming: true,
            ..owner
        },
    ] {
        let read: Vec<Vec<u8>> = script
            .arg("owner")
            .arg(owner.encode())
            .invoke(&mut conn)
            .unwrap();
        let flag = if owner.streaming { "s" } else { "-" };
        let expected: [&[u8]; 5] = [
            b"w-9f",
            b"claim-42",
            b"1700000000999",
            flag.as_bytes(),
            &owner.encode(),
        ];
        assert_eq!(
            read, expected,
            "Lua reads and writes the owner record as Rust does"
        );
    }
    let old_owner = "w-9f\tclaim-42\t1700000000999";
    assert_eq!(Owner::decode(old_owner.as_bytes()), None);
    let read: Vec<String> = script
        .arg("owner")
        .arg(old_owner)
        .invoke(&mut conn)
        .unwrap();
    assert!(read.is_empty(), "Lua read an old owner record: {read:?}");

    // FlowDef.
    let flow = Flow {
        quotas: vec![
            QuotaKey {
                token: "user=alice".into(),
                max_concurrent: 2,
                interval_ms: 1000.0 / 3.0,
                burst: 3,
                max_waiting: 0,
            },
            QuotaKey {
                token: "ip=%3A%3A1".into(),
                max_concurrent: 0,
                interval_ms: 12.5,
                burst: 1,
                max_waiting: 500,
            },
            QuotaKey {
                token: "#0123456789abcdef0123456789abcdef01234567".into(),
                max_concurrent: 1,
                interval_ms: 0.0,
                burst: 0,
                max_waiting: 1,
            },
        ],
    };
    let read: Vec<String> = script
        .arg("def")
        .arg(FlowDef::encode(&flow))
        .invoke(&mut conn)
        .unwrap();
    let lua: Vec<QuotaKey> = read
        .chunks(5)
        .map(|q| QuotaKey {
            token: q[0].clone(),
            max_concurrent: q[1].parse().unwrap(),
            interval_ms: q[2].parse().unwrap(),
            burst: q[3].parse().unwrap(),
            max_waiting: q[4].parse().unwrap(),
        })
        .collect();
    assert_eq!(
        lua,
        flow.quotas,
        "Lua's reading of {:?}",
        FlowDef::encode(&flow)
    );
    let empty: Vec<String> = script.arg("def").arg("").invoke(&mut conn).unwrap();
    assert!(empty.is_empty(), "no quota: {empty:?}");
}

#[test]
fn lua_and_rust_order_jobs_alike() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let script = script();

    // Order scores: strict priority, then arrival.
    for (prio, seq) in [
        (1u8, 1u64),
        (50, 123_456),
        (99, priority::SEQUENCE_SPACE - 1),
        (99, priority::SEQUENCE_SPACE + 5),
    ] {
        let lua: String = script
            .arg("score")
            .arg(prio)
            .arg(seq)
            .invoke(&mut conn)
            .unwrap();
        assert_eq!(lua, priority::score(prio, seq).to_string(), "{prio} {seq}");
    }

    // Flow members: built alike, and Redis's lexical order is the flow's
    // order by score (what flow_head relies on).
    let flows = ["-", "tenant=a", "tenant=a&ip=1", "tenant=ab"];
    let scores = [
        1u64,
        priority::score(1, 9),
        priority::score(50, 9),
        priority::score(50, 10),
        priority::score(99, priority::SEQUENCE_SPACE - 1),
        (1_700_000_000_000 + 98 * 1_000) * 1024 + 7,
    ];
    let key = "thr:{protocol}:flow-jobs";
    let mut rust = Vec::new();
    for flow in flows {
        for (i, score) in scores.iter().rev().enumerate() {
            let id = format!("job-{i}");
            let member = flow_member(flow, *score, &id);
            let lua: String = script
                .arg("member")
                .arg(flow)
                .arg(*score)
                .arg(&id)
                .invoke(&mut conn)
                .unwrap();
            assert_eq!(lua, member);
            let _: i64 = redis::cmd("ZADD")
                .arg(key)
                .arg(0)
                .arg(&member)
                .query(&mut conn)
                .unwrap();
            rust.push((flow, *score, member));
        }
    }
    let in_redis: Vec<String> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    let mut by_flow_then_score = rust.clone();
    by_flow_then_score.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let expected: Vec<&String> = by_flow_then_score.iter().map(|m| &m.2).collect();
    assert_eq!(in_redis.iter().collect::<Vec<_>>(), expected);
    for flow in flows {
        let head: String = script
            .key(key)
            .arg("head")
            .arg(flow)
            .invoke(&mut conn)
            .unwrap();
        let first = rust
            .iter()
            .filter(|m| m.0 == flow)
            .min_by_key(|m| m.1)
            .unwrap();
        assert_eq!(head, first.2, "the head of flow {flow}");
    }
}

/// The scripts the broker runs (`protocol/scripts.rs`).
const SCRIPTS: &[&str] = &[
    "enqueue",
    "withdraw",
    "job_states",
    "claim",
    "renew",
    "release",
    "stream_head",
    "push_pieces",
    "take_pieces",
    "hand_back",
    "put_back",
    "dead_letter",
    "heartbeat",
    "reap_scan",
    "reap",
    "purge",
    "stats",
];

fn scripts_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/thr-broker/scripts")
}

fn lua_stems(dir: &Path) -> Vec<String> {
    let mut stems: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "lua"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    stems.sort();
    stems
}

#[test]
fn every_script_loads_on_redis() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    for name in SCRIPTS {
        let text = script_source(name).unwrap_or_else(|| panic!("no script {name}"));
        assert!(text.starts_with("#!lua"), "{name}: flags line first");
        let sha: Result<String, _> = redis::cmd("SCRIPT").arg("LOAD").arg(text).query(&mut conn);
        let sha = sha.unwrap_or_else(|e| panic!("{name}.lua does not load: {e}"));
        assert_eq!(sha.len(), 40, "{name}: {sha}");
    }
    assert_eq!(script_source("no-such-script"), None);
}

#[test]
fn every_script_and_helper_file_is_served() {
    let dir = scripts_dir();
    let mut listed: Vec<String> = SCRIPTS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(
        lua_stems(&dir),
        listed,
        "scripts/*.lua vs the scripts served"
    );
    for helper in lua_stems(&dir.join("lib")) {
        let served = lua_helper(&helper).unwrap_or_else(|| panic!("lib/{helper}.lua not served"));
        let on_disk = std::fs::read_to_string(dir.join("lib").join(format!("{helper}.lua")))
            .expect("helper file");
        assert_eq!(served, on_disk, "lib/{helper}.lua");
    }
}

/// The helpers the files in `scripts/lib` define.
fn helper_names() -> Vec<String> {
    lua_stems(&scripts_dir().join("lib"))
        .iter()
        .flat_map(|lib| {
            lua_helper(lib)
                .unwrap_or_else(|| panic!("lib/{lib}.lua not served"))
                .lines()
        })
        .filter_map(|l| l.strip_prefix("local function "))
        .map(|rest| rest.split('(').next().unwrap_or(rest).trim().to_string())
        .collect()
}

/// True when `text` calls `name` (a whole name followed by `(`) outside a
/// comment line and a definition.
fn calls(text: &str, name: &str) -> bool {
    let call = format!("{name}(");
    text.lines()
        .filter(|l| !l.trim_start().starts_with("local function ") && !l.starts_with("--"))
        .any(|l| {
            l.match_indices(&call).any(|(at, _)| {
                !l[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        })
}

/// `build.rs` keeps only the helpers a script reaches: none it calls may be
/// missing (Lua would fail only when that line runs).
#[test]
fn every_helper_a_script_calls_is_in_it() {
    let names = helper_names();
    assert!(names.len() > 30, "helpers found: {names:?}");
    for script in SCRIPTS {
        let text = script_source(script).expect("a script");
        for name in &names {
            if calls(text, name) {
                assert!(
                    text.contains(&format!("local function {name}(")),
                    "{script}.lua calls {name} but does not define it"
                );
            }
        }
    }
}

/// ...and leaves out the others: the release defines no rate helper.
#[test]
fn helpers_a_script_never_calls_are_left_out() {
    let release = script_source("release").expect("release");
    assert!(release.contains("local function sem_drop("));
    assert!(!release.contains("local function gcra("));
    assert!(!release.contains("local function sem_sweep("));
}
