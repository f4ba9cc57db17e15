//! What a topology change does, before anyone applies it.
//!
//! Operators (through `tallyctl topology diff|apply`) and the proxy (before
//! swapping its shard map, to decide whether a change merely reconnects or
//! reroutes keys) ask the same question: "what would going from `old` to
//! `new` change?". Answering it in one pure function keeps both sides in
//! agreement and testable without a database.
//!
//! Passwords never appear in a diff: DSNs are shown through
//! [`Dsn::redacted`], and a password change is reported by name only.
//! A password equal to the redaction placeholder `***` on either side counts
//! as "unchanged", because that is what `***` means in the admin API (the
//! server shows `***`; a client sending `***` keeps the current password).
//! The topology `version` is not compared: it differs on every change and is
//! not itself a change.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::dsn::{Dsn, REDACTED};
use crate::ring::ShardRing;
use crate::topology::{GroupSpec, Topology};

/// Everything that differs between two topologies.
///
/// Lists are in a stable order: groups in the order of the topology they
/// come from (added: `new`, removed: `old`), servers in address order, so
/// two runs over the same inputs print the same text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopologyDiff {
    /// Groups only in `new`, with their weight.
    pub groups_added: Vec<GroupWeight>,
    /// Groups only in `old`, with their weight.
    pub groups_removed: Vec<GroupWeight>,
    /// Groups in both whose weight changed.
    pub weight_changes: Vec<WeightChange>,
    /// `Some((old, new))` when the virtual nodes per unit of weight changed.
    pub vnodes: Option<(u32, u32)>,
    /// Server changes of groups present in both topologies (only groups with
    /// at least one change). Servers of added or removed groups are implied
    /// by the group change and not repeated here.
    pub group_changes: Vec<GroupServerChanges>,
    /// The fraction of the hash space, in [0, 1], whose owning group differs
    /// between the two rings: how much data would have to move.
    pub moved_fraction: f64,
}

/// A group name and its weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupWeight {
    pub group: String,
    pub weight: u32,
}

/// A group whose weight changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightChange {
    pub group: String,
    pub old: u32,
    pub new: u32,
}

/// Server-level changes inside one group that exists on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupServerChanges {
    pub group: String,
    /// `Some((old addr, new addr))` when the master is a different server.
    pub master: Option<(String, String)>,
    /// Replica addresses (`host:port`) only in `new`.
    pub replicas_added: Vec<String>,
    /// Replica addresses only in `old`.
    pub replicas_removed: Vec<String>,
    /// Servers of this group at the same address on both sides whose DSN
    /// changed in user, password or database.
    pub dsn_changes: Vec<DsnChange>,
}

/// A server whose address stayed but whose DSN changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DsnChange {
    pub addr: String,
    /// The DSN before, password redacted.
    pub old: String,
    /// The DSN after, password redacted.
    pub new: String,
    /// What changed, from `user`, `password`, `database`; a password change
    /// is only ever named here, never shown.
    pub fields: Vec<&'static str>,
}

impl GroupServerChanges {
    fn is_empty(&self) -> bool {
        self.master.is_none()
            && self.replicas_added.is_empty()
            && self.replicas_removed.is_empty()
            && self.dsn_changes.is_empty()
    }
}

/// Computes what changes from `old` to `new`. Pure; builds both rings.
pub fn diff(old: &Topology, new: &Topology) -> TopologyDiff {
    let groups_added = new
        .groups
        .iter()
        .filter(|g| old.group(&g.name).is_none())
        .map(|g| GroupWeight {
            group: g.name.clone(),
            weight: g.weight,
        })
        .collect();
    let groups_removed = old
        .groups
        .iter()
        .filter(|g| new.group(&g.name).is_none())
        .map(|g| GroupWeight {
            group: g.name.clone(),
            weight: g.weight,
        })
        .collect();

    let mut weight_changes = Vec::new();
    let mut group_changes = Vec::new();
    for n in &new.groups {
        let Some(o) = old.group(&n.name) else {
            continue;
        };
        if o.weight != n.weight {
            weight_changes.push(WeightChange {
                group: n.name.clone(),
                old: o.weight,
                new: n.weight,
            });
        }
        let changes = server_changes(o, n);
        if !changes.is_empty() {
            group_changes.push(changes);
        }
    }

    let vnodes = (old.vnodes != new.vnodes).then_some((old.vnodes, new.vnodes));
    // With no group on one side no key has an owner to move from or to
    // (startup from the empty map): nothing moves.
    let moved_fraction = if old.groups.is_empty() || new.groups.is_empty() {
        0.0
    } else {
        ShardRing::moved_fraction(&ShardRing::new(old), &ShardRing::new(new)).clamp(0.0, 1.0)
    };
    TopologyDiff {
        groups_added,
        groups_removed,
        weight_changes,
        vnodes,
        group_changes,
        moved_fraction,
    }
}

fn server_changes(old: &GroupSpec, new: &GroupSpec) -> GroupServerChanges {
    let master =
        (old.master.addr() != new.master.addr()).then(|| (old.master.addr(), new.master.addr()));

    let replica_addrs = |g: &GroupSpec| -> BTreeMap<String, ()> {
        g.replicas.iter().map(|r| (r.addr(), ())).collect()
    };
    let (old_replicas, new_replicas) = (replica_addrs(old), replica_addrs(new));
    let replicas_added = new_replicas
        .keys()
        .filter(|a| !old_replicas.contains_key(*a))
        .cloned()
        .collect();
    let replicas_removed = old_replicas
        .keys()
        .filter(|a| !new_replicas.contains_key(*a))
        .cloned()
        .collect();

    // Compare DSNs by address across roles: a promoted replica keeps its
    // address, and a credential change on it is still worth reporting.
    let servers = |g: &GroupSpec| -> BTreeMap<String, Dsn> {
        std::iter::once(&g.master)
            .chain(&g.replicas)
            .map(|d| (d.addr(), d.clone()))
            .collect()
    };
    let new_servers = servers(new);
    let dsn_changes = servers(old)
        .into_iter()
        .filter_map(|(addr, o)| {
            let n = new_servers.get(&addr)?;
            let fields = changed_fields(&o, n);
            (!fields.is_empty()).then(|| DsnChange {
                addr,
                old: o.redacted(),
                new: n.redacted(),
                fields,
            })
        })
        .collect();

    GroupServerChanges {
        group: new.name.clone(),
        master,
        replicas_added,
        replicas_removed,
        dsn_changes,
    }
}

/// The DSN fields (other than the address) that differ; `***` on either side
/// matches any password, including none.
fn changed_fields(old: &Dsn, new: &Dsn) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if old.user != new.user {
        fields.push("user");
    }
    let redacted = |d: &Dsn| d.password.as_deref() == Some(REDACTED);
    if !redacted(old) && !redacted(new) && old.password != new.password {
        fields.push("password");
    }
    if old.database != new.database {
        fields.push("database");
    }
    fields
}

impl TopologyDiff {
    /// Whether routing changes, i.e. some keys get a different owner.
    ///
    /// Decided structurally (a group added or removed, a weight or the vnode
    /// count changed), not from `moved_fraction > 0`: the structural answer
    /// is exact and cannot be swayed by floating-point rounding, and every
    /// such change does move part of the ring. Server-only changes (masters,
    /// replicas, credentials) never move keys.
    pub fn moves_keys(&self) -> bool {
        !self.groups_added.is_empty()
            || !self.groups_removed.is_empty()
            || !self.weight_changes.is_empty()
            || self.vnodes.is_some()
    }

    /// Whether nothing at all changes (the version aside).
    pub fn is_empty(&self) -> bool {
        !self.moves_keys() && self.group_changes.is_empty()
    }
}

/// Width of the label column, so values line up ("replicas removed:" is the
/// longest label).
const LABEL: usize = 18;

impl fmt::Display for TopologyDiff {
    /// A readable summary, one change per line, ending with the share of
    /// the hash space that moves. An empty diff prints `no changes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        let mut line = |label: &str, value: String| writeln!(f, "{:<LABEL$}{value}", label);
        if let Some((old, new)) = self.vnodes {
            line("vnodes:", format!("{old} -> {new}"))?;
        }
        for g in &self.groups_added {
            line(
                "groups added:",
                format!("{} (weight {})", g.group, g.weight),
            )?;
        }
        for g in &self.groups_removed {
            line(
                "groups removed:",
                format!("{} (weight {})", g.group, g.weight),
            )?;
        }
        for w in &self.weight_changes {
            line(
                "weight changed:",
                format!("{} {} -> {}", w.group, w.old, w.new),
            )?;
        }
        for g in &self.group_changes {
            if let Some((old, new)) = &g.master {
                line("master changed:", format!("{} {old} -> {new}", g.group))?;
            }
            for r in &g.replicas_added {
                line("replicas added:", format!("{} +{r}", g.group))?;
            }
            for r in &g.replicas_removed {
                line("replicas removed:", format!("{} -{r}", g.group))?;
            }
            for d in &g.dsn_changes {
                line(
                    "dsn changed:",
                    format!(
                        "{} {} ({}): {} -> {}",
                        g.group,
                        d.addr,
                        d.fields.join(", "),
                        d.old,
                        d.new
                    ),
                )?;
            }
        }
        let moving = if self.moves_keys() {
            format!("{} of the hash space", percent(self.moved_fraction))
        } else {
            "none (routing unchanged)".to_owned()
        };
        line("keys moving:", moving)
    }
}

/// `33.4%`, with tiny non-zero shares shown as `<0.1%` rather than `0.0%`,
/// which would read as "nothing moves".
fn percent(fraction: f64) -> String {
    let p = fraction * 100.0;
    if p > 0.0 && p < 0.05 {
        "<0.1%".to_owned()
    } else {
        format!("{p:.1}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::TopologyDoc;

    fn parse(yaml: &str) -> Topology {
        TopologyDoc::parse_and_validate(yaml).expect("valid test topology")
    }

    const TWO: &str = "
vnodes: 160
groups:
  - name: g0
    master: mysql://root:pw@127.0.0.1:3307/tally
    replicas: [ 'mysql://root@127.0.0.1:3308/tally' ]
  - name: g1
    master: mysql://root@127.0.0.1:3309/tally
";

    #[test]
    fn no_change_is_empty() {
        let t = parse(TWO);
        let mut later = t.clone();
        later.version += 5;
        let d = diff(&t, &later);
        assert!(d.is_empty(), "{d:?}");
        assert!(!d.moves_keys());
        assert_eq!(d.moved_fraction, 0.0);
        assert_eq!(d.to_string(), "no changes\n");
    }

    #[test]
    fn adding_a_replica_moves_no_keys() {
        let new = parse(&TWO.replace(
            "replicas: [ 'mysql://root@127.0.0.1:3308/tally' ]",
            "replicas: [ 'mysql://root@127.0.0.1:3308/tally', 'mysql://root@127.0.0.1:3310/tally' ]",
        ));
        let d = diff(&parse(TWO), &new);
        assert!(!d.is_empty());
        assert!(!d.moves_keys());
        assert_eq!(d.moved_fraction, 0.0);
        assert_eq!(d.group_changes.len(), 1);
        assert_eq!(d.group_changes[0].replicas_added, ["127.0.0.1:3310"]);
        let text = d.to_string();
        assert!(
            text.contains("replicas added:   g0 +127.0.0.1:3310"),
            "{text}"
        );
        assert!(text.contains("keys moving:      none"), "{text}");
    }

    #[test]
    fn adding_a_group_moves_about_a_third() {
        let three = format!("{TWO}  - name: g2\n    master: mysql://root@127.0.0.1:3311/tally\n");
        let d = diff(&parse(TWO), &parse(&three));
        assert!(d.moves_keys());
        assert_eq!(
            d.groups_added,
            [GroupWeight {
                group: "g2".into(),
                weight: 1
            }]
        );
        assert!(
            (0.25..0.42).contains(&d.moved_fraction),
            "{}",
            d.moved_fraction
        );
        let text = d.to_string();
        assert!(text.contains("groups added:     g2 (weight 1)"), "{text}");
        assert!(
            text.contains(&format!(
                "keys moving:      {:.1}% of the hash space",
                d.moved_fraction * 100.0
            )),
            "{text}"
        );
        // And the reverse removes it, moving the same share back.
        let back = diff(&parse(&three), &parse(TWO));
        assert_eq!(back.groups_removed[0].group, "g2");
        assert!((back.moved_fraction - d.moved_fraction).abs() < 1e-9);
    }

    #[test]
    fn weight_and_vnode_changes_move_keys() {
        let heavier = parse(&TWO.replace("  - name: g1\n", "  - name: g1\n    weight: 2\n"));
        let d = diff(&parse(TWO), &heavier);
        assert!(d.moves_keys());
        assert!(d.moved_fraction > 0.05, "{}", d.moved_fraction);
        assert_eq!(
            d.weight_changes,
            [WeightChange {
                group: "g1".into(),
                old: 1,
                new: 2
            }]
        );
        assert!(d.to_string().contains("weight changed:   g1 1 -> 2"));

        let d = diff(
            &parse(TWO),
            &parse(&TWO.replace("vnodes: 160", "vnodes: 200")),
        );
        assert!(d.moves_keys());
        assert!(d.moved_fraction > 0.0);
        assert_eq!(d.vnodes, Some((160, 200)));
    }

    #[test]
    fn password_change_is_reported_without_the_password() {
        let new = parse(&TWO.replace("root:pw@", "root:hunter2@"));
        let d = diff(&parse(TWO), &new);
        assert!(!d.moves_keys());
        let change = &d.group_changes[0].dsn_changes[0];
        assert_eq!(change.addr, "127.0.0.1:3307");
        assert_eq!(change.fields, ["password"]);
        let text = format!("{d}{d:?}{}", serde_json::json!(d));
        assert!(
            text.contains("dsn changed:      g0 127.0.0.1:3307 (password)"),
            "{text}"
        );
        assert!(
            !text.contains("hunter2") && !text.contains(":pw@"),
            "{text}"
        );
    }

    #[test]
    fn redacted_password_on_either_side_counts_as_unchanged() {
        let shown = parse(&TWO.replace("root:pw@", "root:***@"));
        assert!(diff(&shown, &parse(TWO)).is_empty());
        assert!(diff(&parse(TWO), &shown).is_empty());
        // But a user change next to a redacted password is still seen.
        let d = diff(&shown, &parse(&TWO.replace("root:pw@", "app:pw@")));
        assert_eq!(d.group_changes[0].dsn_changes[0].fields, ["user"]);
    }

    #[test]
    fn promotion_changes_master_and_replicas_but_not_routing() {
        let promoted = parse(
            "
groups:
  - name: g0
    master: mysql://root@127.0.0.1:3308/tally
    replicas: [ 'mysql://root:pw@127.0.0.1:3307/tally' ]
  - name: g1
    master: mysql://root@127.0.0.1:3309/tally
",
        );
        let d = diff(&parse(TWO), &promoted);
        assert!(!d.moves_keys());
        let g0 = &d.group_changes[0];
        assert_eq!(
            g0.master,
            Some(("127.0.0.1:3307".into(), "127.0.0.1:3308".into()))
        );
        assert_eq!(g0.replicas_added, ["127.0.0.1:3307"]);
        assert_eq!(g0.replicas_removed, ["127.0.0.1:3308"]);
        assert!(g0.dsn_changes.is_empty(), "{:?}", g0.dsn_changes);
        let text = d.to_string();
        assert!(
            text.contains("master changed:   g0 127.0.0.1:3307 -> 127.0.0.1:3308"),
            "{text}"
        );
    }
}
