//! Fuzzes the topology document: YAML (or JSON) → `TopologyDoc` →
//! validated `Topology`, as the topology file, `PUT /admin/v1/topology` and
//! `tallyctl` read it. Parsing and validation must never panic, a rejection
//! must name at least one problem, and an accepted topology must survive
//! the round trip through the file the proxy writes back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_admin::{ShardRing, TopologyDoc};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match TopologyDoc::parse_and_validate(text) {
        Ok(topology) => {
            assert!(!topology.groups.is_empty());
            // The proxy persists what it accepted and must read it back.
            let again = TopologyDoc::parse_and_validate(&topology.to_yaml())
                .unwrap_or_else(|e| panic!("persisted topology does not parse back: {e}"));
            assert_eq!(again, topology);
            // The redacted document (what GET shows) is still a valid one.
            let redacted = topology.to_doc(true);
            if let Err(e) = redacted.validate() {
                panic!("the redacted document is invalid: {e}");
            }
            // Build the ring when it is small enough to stay fast.
            let vnodes: u64 = topology
                .groups
                .iter()
                .map(|g| u64::from(topology.vnodes) * u64::from(g.weight))
                .sum();
            if vnodes <= 1_000 {
                let ring = ShardRing::new(&topology);
                assert!(ring.owner(b"views\0k").is_some());
            }
        }
        Err(invalid) => assert!(!invalid.problems.is_empty()),
    }
});
