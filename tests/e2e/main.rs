//! End-to-end tests of thr over a real `redis-server` (one per test, on a
//! free port) and real HTTP backends. One binary, one module per theme.

mod support;

mod broker;
mod config;
mod conformance;
mod dashboard;
mod edge;
mod faults;
mod limits;
mod operator;
mod protocol;
mod quota_lua;
mod recovery;
mod resilience;
mod routing;
mod rules;
mod streaming;
mod thrctl;
mod tls;
mod transparency;
mod tunnel;
