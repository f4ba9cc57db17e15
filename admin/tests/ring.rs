//! Ring placement tests: the golden vector that pins routing across releases
//! and the distribution of keys against weights.

use tally_admin::{ShardRing, Topology, TopologyDoc, routing_key};

const GOLDEN: &str = "tests/golden/ring_1000.tsv";

fn fixed_topology() -> Topology {
    TopologyDoc::parse_and_validate(
        "version: 1
vnodes: 160
groups:
  - { name: g0, weight: 1, master: 'mysql://root@10.0.0.1:3306/tally' }
  - { name: g1, weight: 2, master: 'mysql://root@10.0.0.2:3306/tally' }
  - { name: g2, weight: 1, master: 'mysql://root@10.0.0.3:3306/tally' }
",
    )
    .expect("fixed topology is valid")
}

/// The 1,000 fixed keys: plain, numeric, unicode and hostile shapes.
fn golden_keys() -> Vec<(String, String)> {
    (0..1000)
        .map(|i| {
            let ns = ["views", "follows", "apm_latency"][i % 3].to_owned();
            let key = match i % 4 {
                0 => format!("BV1x{i:05}"),
                1 => i.to_string(),
                2 => format!("vidéo-{i}-動画"),
                _ => format!("'; DROP TABLE counter_total; -- {i}"),
            };
            (ns, key)
        })
        .collect()
}

fn render(ring: &ShardRing) -> String {
    golden_keys()
        .iter()
        .map(|(ns, key)| {
            let rk = routing_key(ns, key);
            let owner = ring.owner_name(&rk).unwrap_or("<none>");
            format!("{ns}\t{key}\t{}\t{owner}\n", ShardRing::position(&rk))
        })
        .collect()
}

/// Fails when any key's ring position or owner differs from the committed
/// vector. Regenerate only on purpose (a deliberate, documented reroute) with
/// `TALLY_BLESS=1 cargo test -p tally-admin --test ring`.
#[test]
fn golden_vector_pins_1000_owners() {
    let actual = render(&ShardRing::new(&fixed_topology()));
    if std::env::var_os("TALLY_BLESS").is_some() {
        std::fs::write(GOLDEN, &actual).expect("write golden file");
    }
    let expected = std::fs::read_to_string(GOLDEN).expect("golden file present");
    assert_eq!(expected.lines().count(), 1000);
    for (n, (e, a)) in expected.lines().zip(actual.lines()).enumerate() {
        assert_eq!(e, a, "golden line {} differs: routing changed", n + 1);
    }
}

/// Measures each group's share of 1M keys against its weight share. At 160
/// vnodes per unit of weight the worst deviation seen is stated in
/// ARCHITECTURE.md; the bound asserted here is the issue's ±10% target.
#[test]
fn distribution_of_one_million_keys_follows_weights() {
    let topo = fixed_topology();
    let ring = ShardRing::new(&topo);
    let mut counts = vec![0u64; topo.groups.len()];
    let n = 1_000_000u64;
    for i in 0..n {
        let rk = routing_key("views", &format!("key-{i}"));
        counts[ring.owner(&rk).expect("non-empty ring")] += 1;
    }
    let total_weight: u32 = topo.groups.iter().map(|g| g.weight).sum();
    let mut worst: f64 = 0.0;
    for (g, count) in topo.groups.iter().zip(&counts) {
        let want = g.weight as f64 / total_weight as f64;
        let got = *count as f64 / n as f64;
        let deviation = (got - want) / want;
        println!(
            "{}: weight share {want:.4}, key share {got:.4}, deviation {:+.2}%",
            g.name,
            deviation * 100.0
        );
        worst = worst.max(deviation.abs());
    }
    println!("worst relative deviation: {:.2}%", worst * 100.0);
    assert!(
        worst <= 0.10,
        "worst deviation {:.2}% exceeds ±10%",
        worst * 100.0
    );
}
