//! The scenarios' request generators.
//!
//! Batched bodies are built before the run (a pool large enough to touch
//! every counter several times) so that the generator spends its CPU on
//! sending, not on JSON; each body remembers its keys so the expected
//! count of every counter is known after the run.

use std::sync::Arc;

use bytes::Bytes;

use super::http::Req;
use super::keys::KeySpace;
use super::load::{Credit, Workload};

/// `POST /v1/events` with pre-built JSON arrays of `per_request` events.
pub struct IngestBatch {
    bodies: Vec<Bytes>,
    /// Key indexes of each body (one entry per event, delta 1 each).
    pub body_keys: Vec<Vec<u32>>,
    per_request: u64,
}

/// Event timestamps of a batched workload: all now, or spread over the
/// `minutes` before `now` (unix seconds), one minute after another.
#[derive(Debug, Clone, Copy)]
pub enum Times {
    Now,
    Spread { now: i64, minutes: u32 },
}

impl IngestBatch {
    pub fn new(ns: &str, keys: &KeySpace, per_request: usize, seed: u64) -> IngestBatch {
        Self::with_times(ns, keys, per_request, seed, Times::Now)
    }

    pub fn with_times(
        ns: &str,
        keys: &KeySpace,
        per_request: usize,
        seed: u64,
        times: Times,
    ) -> IngestBatch {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Enough bodies to draw every counter about four times, at least 64.
        let n = (4 * keys.len() / per_request.max(1)).clamp(64, 4096);
        let mut bodies = Vec::with_capacity(n);
        let mut body_keys = Vec::with_capacity(n);
        let mut minute = 0u32;
        for _ in 0..n {
            let idx: Vec<u32> = (0..per_request)
                .map(|_| keys.sample(&mut rng) as u32)
                .collect();
            let body = match times {
                Times::Now => events_json(ns, keys, &idx),
                Times::Spread { now, minutes } => {
                    let ts: Vec<i64> = idx
                        .iter()
                        .map(|_| {
                            minute = (minute + 1) % minutes.max(1);
                            now - 60 * i64::from(minute)
                        })
                        .collect();
                    events_json_at(ns, keys, &idx, &ts)
                }
            };
            bodies.push(Bytes::from(body));
            body_keys.push(idx);
        }
        IngestBatch {
            bodies,
            body_keys,
            per_request: per_request as u64,
        }
    }

    /// Expected count per key after the run's body credits.
    pub fn expected(&self, nkeys: usize, body_credits: &[u64]) -> Vec<i64> {
        let mut exp = vec![0i64; nkeys];
        for (b, &times) in body_credits.iter().enumerate() {
            if times > 0 {
                for &k in &self.body_keys[b] {
                    exp[k as usize] += times as i64;
                }
            }
        }
        exp
    }
}

/// [`events_json`] with a `ts` per event.
pub fn events_json_at(ns: &str, keys: &KeySpace, idx: &[u32], ts: &[i64]) -> Vec<u8> {
    let mut s = String::with_capacity(idx.len() * 64);
    s.push('[');
    for (i, (&k, t)) in idx.iter().zip(ts).enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(r#"{"ns":""#);
        s.push_str(ns);
        s.push_str(r#"","key":""#);
        s.push_str(keys.name(k as usize));
        s.push_str(r#"","delta":1,"ts":"#);
        s.push_str(&t.to_string());
        s.push('}');
    }
    s.push(']');
    s.into_bytes()
}

/// `[{"ns":..,"key":..,"delta":1}, ...]` for the given key indexes.
pub fn events_json(ns: &str, keys: &KeySpace, idx: &[u32]) -> Vec<u8> {
    let mut s = String::with_capacity(idx.len() * 48);
    s.push('[');
    for (i, &k) in idx.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(r#"{"ns":""#);
        s.push_str(ns);
        s.push_str(r#"","key":""#);
        s.push_str(keys.name(k as usize));
        s.push_str(r#"","delta":1}"#);
    }
    s.push(']');
    s.into_bytes()
}

impl Workload for IngestBatch {
    fn events(&self, credit: Credit) -> u64 {
        match credit {
            Credit::Body(_) => self.per_request,
            _ => 0,
        }
    }
    fn next(&self, rng: &mut fastrand::Rng) -> (Req, Credit) {
        let b = rng.usize(..self.bodies.len());
        (
            Req::post("/v1/events".into(), self.bodies[b].clone()),
            Credit::Body(b as u32),
        )
    }
    fn credit_sizes(&self) -> (usize, usize) {
        (0, self.bodies.len())
    }
}

/// `POST /v1/counters/{ns}/{key}/incr`, one event per request.
pub struct IngestSingle {
    pub ns: String,
    pub keys: Arc<KeySpace>,
}

impl Workload for IngestSingle {
    fn events(&self, credit: Credit) -> u64 {
        matches!(credit, Credit::Key(_)) as u64
    }
    fn next(&self, rng: &mut fastrand::Rng) -> (Req, Credit) {
        let k = self.keys.sample(rng);
        let path = format!("/v1/counters/{}/{}/incr", self.ns, self.keys.name(k));
        (Req::post(path, Bytes::new()), Credit::Key(k as u32))
    }
    fn credit_sizes(&self) -> (usize, usize) {
        (self.keys.len(), 0)
    }
}

/// Reads: `total`, `count` over a range, or `top`.
pub enum ReadKind {
    Total,
    /// `count` over `[from, to)`.
    Range {
        from: i64,
        to: i64,
    },
    Top {
        limit: usize,
    },
}

pub struct Query {
    pub ns: String,
    pub keys: Arc<KeySpace>,
    pub kind: ReadKind,
    /// `&consistency=...` or empty.
    pub consistency: Option<String>,
}

impl Query {
    fn path(&self, rng: &mut fastrand::Rng) -> String {
        let c = self.consistency.as_deref();
        match self.kind {
            ReadKind::Total => {
                let k = self.keys.name(self.keys.sample(rng));
                match c {
                    Some(c) => format!("/v1/counters/{}/{k}?consistency={c}", self.ns),
                    None => format!("/v1/counters/{}/{k}", self.ns),
                }
            }
            ReadKind::Range { from, to } => {
                let k = self.keys.name(self.keys.sample(rng));
                let mut p = format!("/v1/counters/{}/{k}/count?from={from}&to={to}", self.ns);
                if let Some(c) = c {
                    p.push_str(&format!("&consistency={c}"));
                }
                p
            }
            ReadKind::Top { limit } => {
                let mut p = format!("/v1/top/{}?limit={limit}", self.ns);
                if let Some(c) = c {
                    p.push_str(&format!("&consistency={c}"));
                }
                p
            }
        }
    }
}

impl Workload for Query {
    fn events(&self, _: Credit) -> u64 {
        0
    }
    fn next(&self, rng: &mut fastrand::Rng) -> (Req, Credit) {
        (Req::get(self.path(rng)), Credit::None)
    }
    fn credit_sizes(&self) -> (usize, usize) {
        (0, 0)
    }
}

/// Batched writes mixed with reads: `write_pct`% batched ingest (bodies of
/// the batch workload), the rest split 4:1 between totals and range counts.
pub struct Mixed {
    pub ingest: IngestBatch,
    pub total: Query,
    pub range: Query,
    pub write_pct: u8,
}

impl Workload for Mixed {
    fn events(&self, credit: Credit) -> u64 {
        self.ingest.events(credit)
    }
    fn next(&self, rng: &mut fastrand::Rng) -> (Req, Credit) {
        let roll = rng.u8(..100);
        if roll < self.write_pct {
            self.ingest.next(rng)
        } else if rng.u8(..5) < 4 {
            self.total.next(rng)
        } else {
            self.range.next(rng)
        }
    }
    fn credit_sizes(&self) -> (usize, usize) {
        self.ingest.credit_sizes()
    }
}
