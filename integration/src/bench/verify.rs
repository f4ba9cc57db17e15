//! After every ingest run: flush, read every counter back and compare it
//! with what was sent. A difference fails the benchmark.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::keys::KeySpace;
use super::target::Endpoint;

/// `POST /admin/v1/flush` until it answers 200 (a 503 means a group did
/// not commit within the proxy's commit timeout: the data stays queued, so
/// asking again is safe); returns the wall time it took.
pub async fn flush(client: &reqwest::Client, ep: &Endpoint) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        match flush_once(client, ep).await {
            Err(e)
                if e.starts_with("flush answered 503")
                    && t.elapsed() < Duration::from_secs(600) =>
            {
                eprintln!("  {e}; asking again");
            }
            Err(e) => return Err(e),
            Ok(()) => return Ok(t.elapsed()),
        }
    }
}

async fn flush_once(client: &reqwest::Client, ep: &Endpoint) -> Result<(), String> {
    let r = client
        .post(format!("{}/admin/v1/flush", ep.admin_url))
        .bearer_auth(&ep.token)
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .map_err(|e| format!("flush: {e}"))?;
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    if status != 200 {
        return Err(format!("flush answered {status}: {body}"));
    }
    Ok(())
}

/// Reads the totals of every key (1,000 per `POST /v1/counters/query`,
/// `consistency=strong`) and compares them with `expected`.
pub async fn check_totals(
    client: &reqwest::Client,
    ep: &Endpoint,
    ns: &str,
    keys: &KeySpace,
    expected: &[i64],
) -> Result<u64, String> {
    let mut mismatches = Vec::new();
    let mut total = 0u64;
    for (chunk_no, chunk) in keys.names().chunks(1000).enumerate() {
        let body = json!({ "ns": ns, "keys": chunk });
        let r = client
            .post(ep.url("/v1/counters/query?consistency=strong"))
            .json(&body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| format!("read back: {e}"))?;
        let status = r.status().as_u16();
        let v: Value = r.json().await.map_err(|e| format!("read back: {e}"))?;
        if status != 200 {
            return Err(format!("read back answered {status}: {v}"));
        }
        let results = v["results"].as_array().ok_or("no results array")?;
        for (i, item) in results.iter().enumerate() {
            let idx = chunk_no * 1000 + i;
            let got = item["count"].as_i64().unwrap_or(i64::MIN);
            total += got.max(0) as u64;
            if item["key"].as_str() != Some(keys.name(idx)) || got != expected[idx] {
                mismatches.push(format!(
                    "{ns}/{}: read {got}, sent {}",
                    keys.name(idx),
                    expected[idx]
                ));
            }
        }
    }
    if mismatches.is_empty() {
        Ok(total)
    } else {
        Err(format!(
            "READ-BACK MISMATCH: {} of {} counters differ from what was sent; first: {}",
            mismatches.len(),
            keys.len(),
            mismatches[..mismatches.len().min(10)].join("; ")
        ))
    }
}

/// Flush, then check; prints one line.
pub async fn flush_and_check(
    client: &reqwest::Client,
    ep: &Endpoint,
    ns: &str,
    keys: &KeySpace,
    expected: &[i64],
) -> Result<(), String> {
    let took = flush(client, ep).await?;
    let sum = check_totals(client, ep, ns, keys, expected).await?;
    eprintln!(
        "  verified: flush took {:.2}s; {} counters of ns {ns} read back (strong) equal what was sent ({sum} events)",
        took.as_secs_f64(),
        keys.len()
    );
    Ok(())
}
