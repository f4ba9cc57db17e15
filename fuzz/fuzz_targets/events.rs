//! Fuzzes the ingest body parser (`tally_proxy::domain::event::parse_body`): JSON
//! objects, JSON arrays and NDJSON, as `POST /v1/events` feeds it.
//!
//! Input layout: byte 0 picks the format (bit 0) and the event limit
//! (bits 1-3); the rest is the body. Beyond "never panics", every accepted
//! event must satisfy the contract's rules, the count must match the body,
//! and a rejection must carry one of the codes the endpoint documents.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tally_proxy::error::ApiError;
use tally_proxy::domain::event::{self, BodyFormat, MAX_DELTA, MAX_KEY_BYTES, MIN_DELTA, Window};

const NOW: i64 = 1_750_000_000;
const LIMITS: [usize; 8] = [1, 2, 3, 5, 10, 100, 1000, 10_000];

fuzz_target!(|data: &[u8]| {
    let Some((&head, body)) = data.split_first() else {
        return;
    };
    let format = if head & 1 == 0 {
        BodyFormat::Json
    } else {
        BodyFormat::Ndjson
    };
    let limit = LIMITS[usize::from((head >> 1) & 7)];
    let window = Window {
        now: NOW,
        max_age: Duration::from_secs(7 * 86400),
        max_future: Duration::from_secs(300),
    };
    match event::parse_body(body, format, window, limit) {
        Ok(events) => {
            assert!(
                !events.is_empty() && events.len() <= limit,
                "count {}",
                events.len()
            );
            for e in &events {
                assert!(event::valid_ns(&e.ns), "ns {:?}", e.ns);
                assert!(
                    (1..=MAX_KEY_BYTES).contains(&e.key.len()),
                    "key {:?}",
                    e.key
                );
                assert!(!e.key.chars().any(char::is_control), "key {:?}", e.key);
                assert!(
                    (MIN_DELTA..=MAX_DELTA).contains(&e.delta),
                    "delta {}",
                    e.delta
                );
                assert!((NOW - 7 * 86400..=NOW + 300).contains(&e.ts), "ts {}", e.ts);
            }
            // What we accepted is what a generic parser sees in the body.
            match format {
                BodyFormat::Json => {
                    let value: serde_json::Value =
                        serde_json::from_slice(body).expect("accepted JSON must be JSON");
                    let n = value.as_array().map_or(1, Vec::len);
                    assert_eq!(n, events.len());
                }
                BodyFormat::Ndjson => {
                    let lines = body
                        .split(|b| *b == b'\n')
                        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                        .count();
                    assert_eq!(lines, events.len());
                }
            }
        }
        Err(e) => {
            let index = match &e {
                ApiError::InvalidEvent { index, .. } | ApiError::TsOutOfRange { index, .. } => {
                    *index
                }
                ApiError::InvalidJson(_) | ApiError::PayloadTooLarge(_) => None,
                other => panic!("unexpected error kind {}: {other}", other.code()),
            };
            if let Some(i) = index {
                assert!(i < limit, "index {i} beyond the limit {limit}");
            }
        }
    }
});
