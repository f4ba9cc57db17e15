//! Fuzzes query-parameter parsing and range planning: the pure front half of
//! every read handler (`tally_proxy::testing::read_api::*_request`), the `incr`
//! parameters, and the planner on raw `i64` ranges.
//!
//! Input layout: byte 0 picks the endpoint; the rest is a query string (for
//! `POST /v1/counters/query`: query, a newline, then the JSON body). Beyond
//! "never panics" it checks what the handlers rely on: a plan covers its
//! range exactly, with aligned pieces and no tier left unused where a
//! coarser one fits; series stay within the point limit; limits and key
//! counts stay within bounds.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tally_proxy::testing::Tier;
use tally_proxy::domain::event::{self, Window};
use tally_proxy::testing::Params;
use tally_proxy::domain::planner::{self, Piece};
use tally_proxy::testing::{MAX_KEYS, MAX_POINTS, MAX_TOP, read_api};

const NOW: i64 = 1_750_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 7 {
        0 => {
            let _ = read_api::total_request(Some(&text));
        }
        1 => {
            if let Ok(r) = read_api::count_request(Some(&text)) {
                assert!(r.from % 60 == 0 && r.to % 60 == 0, "{r:?}");
                check_plan(r.from, r.to, &r.pieces);
            }
        }
        2 => {
            if let Ok(r) = read_api::series_request(Some(&text)) {
                let width = r.tier.width().expect("series steps have a width");
                assert!(r.from % width == 0 && r.to % width == 0, "{r:?}");
                assert!(r.from <= r.to, "{r:?}");
                let points = (i128::from(r.to) - i128::from(r.from)) / i128::from(width);
                assert!(points <= i128::from(MAX_POINTS), "{r:?}");
            }
        }
        3 => {
            if let Ok(r) = read_api::top_request(Some(&text)) {
                assert!((1..=MAX_TOP).contains(&r.limit), "{r:?}");
                check_optional(r.range, r.pieces.as_deref());
            }
        }
        4 => {
            let (query, body) = text.split_once('\n').unwrap_or((&text, ""));
            if let Ok(r) = read_api::multi_request(Some(query), body.as_bytes()) {
                assert!(event::valid_ns(&r.ns), "{r:?}");
                assert!((1..=MAX_KEYS).contains(&r.keys.len()), "{r:?}");
                check_optional(r.range, r.pieces.as_deref());
            }
        }
        5 => {
            // POST /v1/counters/{ns}/{key}/incr: what the handler does with
            // its query string.
            let Ok(params) = Params::parse(Some(&text), &["delta", "ts", "ack"]) else {
                return;
            };
            let _ = params.choice("ack", &["buffered", "committed"], "buffered");
            let Ok(delta) = params.i64("delta") else {
                return;
            };
            let window = Window {
                now: NOW,
                max_age: Duration::from_secs(7 * 86400),
                max_future: Duration::from_secs(300),
            };
            if let Ok(e) = event::single("views", "k", delta, params.get("ts"), window) {
                assert!((event::MIN_DELTA..=event::MAX_DELTA).contains(&e.delta));
                assert!((NOW - 7 * 86400..=NOW + 300).contains(&e.ts));
            }
        }
        _ => {
            // The planner on any range, including the extremes of i64.
            if rest.len() < 16 {
                return;
            }
            let a = i64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let b = i64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
            let (from, to) = planner::minute_range(a.min(b), a.max(b));
            check_plan(from, to, &planner::plan(from, to));
        }
    }
});

fn check_optional(range: Option<(i64, i64)>, pieces: Option<&[Piece]>) {
    match (range, pieces) {
        (None, None) => {}
        (Some((from, to)), Some(pieces)) => {
            assert!(from % 60 == 0 && to % 60 == 0, "[{from}, {to})");
            check_plan(from, to, pieces);
        }
        other => panic!("range and plan disagree: {other:?}"),
    }
}

/// The pieces tile `[from, to)` exactly, in order, each aligned to its tier,
/// and no piece could have used a coarser tier for a whole bucket.
fn check_plan(from: i64, to: i64, pieces: &[Piece]) {
    if from >= to {
        assert!(pieces.is_empty(), "[{from}, {to}) planned as {pieces:?}");
        return;
    }
    assert!(pieces.len() <= 5, "{pieces:?}");
    assert_eq!(pieces.first().map(|p| p.start), Some(from), "{pieces:?}");
    assert_eq!(pieces.last().map(|p| p.end), Some(to), "{pieces:?}");
    for pair in pieces.windows(2) {
        assert_eq!(pair[0].end, pair[1].start, "gap or overlap in {pieces:?}");
    }
    for p in pieces {
        assert!(p.start < p.end, "{pieces:?}");
        let width = p.tier.width().expect("plans use bucketed tiers");
        assert!(
            p.start.rem_euclid(width) == 0 && p.end.rem_euclid(width) == 0,
            "unaligned {p:?}"
        );
        let coarser = match p.tier {
            Tier::Minute => 3600,
            Tier::Hour => 86400,
            _ => continue,
        };
        // The first coarser boundary at or after the piece's start.
        let first = i128::from(p.start) + i128::from(-p.start).rem_euclid(coarser);
        assert!(
            first + coarser > i128::from(p.end),
            "{p:?} holds a whole {coarser}s bucket"
        );
    }
}
