//! The fault soak for CI: at least 60 seconds of faults (every kind at least
//! twice, except the master kill with promotion: once, in one group), with two
//! proxies sharing a topology store, on `durability: wal` so that kill -9 of a
//! proxy is one of them, proxy 2's store path black-holed past the alive window
//! and a planned switchover (and back) under both proxies among them, under
//! `ack=committed` and `ack=buffered` load spread over both proxies, next to
//! hostile clients (slow and maximal bodies, colliding keys, wide minute
//! spreads, strong top-K storms); nothing acknowledged may be lost, nothing
//! counted twice, the system must recover from every fault (a committed write
//! through each proxy), a switchover must be planned and followed by proxy 2,
//! the writers must be served between faults and every bound the hostile
//! clients push must hold.
//!
//! A second, shorter soak runs the writers with idempotency ids (`tally-chaos
//! --ids`): every event carries an id and every failed request is retried,
//! same ids, until it is acknowledged, so the verdict is exact equality of
//! every counter with the ledger, not just "nothing lost, nothing doubled".

use std::time::Duration;

use tally_integration::chaos::{self, ChaosConfig, FaultKind, HostileKind};

/// Every kind of fault a soak with the WAL injects.
const KINDS: [FaultKind; 11] = [
    FaultKind::KillReplica,
    FaultKind::KillMasterAndPromote,
    FaultKind::CutAfterCommit,
    FaultKind::StopReplication,
    FaultKind::RestartProxy,
    FaultKind::KillProxy,
    FaultKind::BlackHoleCommit,
    FaultKind::OverflowCounter,
    FaultKind::StopWithDeadMaster,
    FaultKind::BlackHoleStore,
    FaultKind::Switchover,
];

/// Runs a soak with the freshly built `tally-proxy` binary (the
/// `proxy_bin` given is replaced).
async fn soak(cfg: ChaosConfig) -> chaos::ChaosReport {
    let proxy_bin =
        tokio::task::spawn_blocking(|| tally_integration::cargo_bin("tally-proxy", "tally-proxy"))
            .await
            .expect("build");
    chaos::run(ChaosConfig { proxy_bin, ..cfg })
        .await
        .expect("soak ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_twice_loses_and_doubles_nothing() {
    let seed = fastrand::u64(..);
    let report = soak(ChaosConfig {
        duration: Duration::from_secs(60),
        every: Duration::from_secs(2),
        seed,
        wal: true,
        // Eleven kinds of fault (with the WAL), each at least twice: about
        // three minutes (two black-holed COMMITs take 30 s each, two
        // black-holed store paths 8 s each).
        min_rounds: 2,
        hostile: true,
        ids: false,
        proxy_bin: Default::default(),
    })
    .await;
    println!("seed {seed}\n{}", report.render());
    assert!(report.acked_requests > 100, "{}", report.render());
    for kind in KINDS {
        let injected = report.faults.get(&kind).map_or(0, |f| f.injected);
        // Only one group's master is promoted away, once per run.
        let least = if kind == FaultKind::KillMasterAndPromote {
            1
        } else {
            2
        };
        assert!(
            injected >= least,
            "{} injected {injected} times (seed {seed})",
            kind.name()
        );
    }
    assert!(
        report.lost.is_empty(),
        "seed {seed}: lost {:?}",
        report.lost
    );
    assert!(
        report.doubled.is_empty(),
        "seed {seed}: doubled {:?}",
        report.doubled
    );
    // Every switchover answered `mode: planned` and proxy 2 followed it;
    // the proxy not restarted kept serving.
    assert!(
        report.problems.is_empty(),
        "seed {seed}: {:?}\n{}",
        report.problems,
        report.render()
    );
    // Well-behaved writers keep being served: in every pause between two
    // faults, with the hostile clients running throughout.
    assert!(report.pauses > 0, "{}", report.render());
    assert_eq!(
        report.unserved_pauses,
        0,
        "seed {seed}: writers went unserved between faults\n{}",
        report.render()
    );
    // Every hostile client ran and met the bound it pushes at least once;
    // nothing it got broke a bound or the ledger.
    let hostile = |kind: HostileKind| report.hostile.get(&kind).cloned().unwrap_or_default();
    for kind in HostileKind::ALL {
        let h = hostile(kind);
        assert_eq!(
            h.unexpected,
            0,
            "seed {seed}: {}: {:?}\n{}",
            kind.name(),
            h.examples,
            report.render()
        );
    }
    for (kind, answer) in [
        (HostileKind::TrickledBody, "408"),
        (HostileKind::CrawlingBody, "408"),
        (HostileKind::MaximalBody, "200"),
        (HostileKind::MaximalBody, "413"),
        (HostileKind::CollidingKeys, "200"),
        (HostileKind::MinuteSpread, "200"),
        (HostileKind::MinuteSpread, "400"),
        (HostileKind::StrongTopK, "200"),
    ] {
        assert!(
            hostile(kind).answered(answer) > 0,
            "seed {seed}: {} never got {answer}\n{}",
            kind.name(),
            report.render()
        );
    }
    assert!(
        hostile(HostileKind::StrongTopK).ledger_checked > 0,
        "seed {seed}: no strong top-K answer of the ledger's namespace was checked\n{}",
        report.render()
    );
    assert!(
        report.ok(),
        "seed {seed}: not every fault recovered\n{}",
        report.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ids_every_retried_write_counts_exactly_once_through_every_fault() {
    let seed = fastrand::u64(..);
    let report = soak(ChaosConfig {
        duration: Duration::from_secs(30),
        every: Duration::from_secs(2),
        seed,
        wal: true,
        // Every kind once: what a retry meets after each fault (a lost
        // answer, a killed or restarted proxy, a promotion, a fenced store
        // path) must still count the retried events exactly once.
        min_rounds: 1,
        hostile: false,
        ids: true,
        proxy_bin: Default::default(),
    })
    .await;
    println!("seed {seed}\n{}", report.render());
    assert!(report.exact, "the ids soak must judge by exact equality");
    assert!(report.acked_requests > 100, "{}", report.render());
    for kind in KINDS {
        let injected = report.faults.get(&kind).map_or(0, |f| f.injected);
        assert!(
            injected >= 1,
            "{} never injected (seed {seed})\n{}",
            kind.name(),
            report.render()
        );
    }
    assert_eq!(
        report.unresolved,
        0,
        "seed {seed}: writes given up\n{}",
        report.render()
    );
    assert!(
        report.lost.is_empty() && report.doubled.is_empty(),
        "seed {seed}: not exact: lost {:?}, doubled {:?}\n{}",
        report.lost,
        report.doubled,
        report.render()
    );
    assert!(
        report.ok(),
        "seed {seed}: not every fault recovered\n{}",
        report.render()
    );
}
