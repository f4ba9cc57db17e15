//! The topology: which MariaDB groups exist, their weights and servers.
//!
//! [`TopologyDoc`] is the document as written in the topology file or sent to
//! `PUT /admin/v1/topology`; [`Topology`] is the validated value the proxy
//! builds its shard map from. The only way from one to the other is
//! [`TopologyDoc::validate`], which reports every problem at once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::dsn::{Dsn, Secret};
use crate::problems::{Invalid, Problems};
use crate::yaml;

/// Virtual nodes per unit of weight when the file does not say.
pub const DEFAULT_VNODES: u32 = 160;
const MAX_VNODES: u32 = 10_000;
const MAX_WEIGHT: u32 = 1000;

/// The topology document, as stored and as exchanged over the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopologyDoc {
    /// Set by the server; ignored in a `PUT` body (`If-Match` carries the
    /// expected version).
    #[serde(default)]
    pub version: u64,
    /// Virtual nodes per unit of weight on the hash ring.
    #[serde(default = "default_vnodes")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10000))]
    pub vnodes: u32,
    #[serde(default)]
    pub groups: Vec<GroupDoc>,
    /// Present only while an online reshard runs (see [`Migration`]);
    /// written by the reshard workflow, never by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// The **admin user**: schema changes, promotion and fencing
    /// (`read_only`, `CHANGE MASTER`, ending the data user's sessions) run
    /// with these credentials on every server of the topology, while the
    /// DSNs' own user (the **data user**, no global privilege) flushes and
    /// reads, so `read_only` fences it. Absent (topologies written before
    /// it existed): the DSN user does both, and nothing fences it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminUser>,
    /// How the last reshard ended (see [`LastReshard`]), so that every
    /// proxy answers it, across restarts. Written by the reshard workflow
    /// in the version that ends the reshard; a `PUT` or a file that omits
    /// or changes it keeps the running one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reshard: Option<LastReshard>,
}

/// The outcome of the last reshard that ended (see
/// [`TopologyDoc::last_reshard`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastReshard {
    /// The id `POST /admin/v1/reshard` answered (for a cancelled reshard,
    /// the cancelled one's, not its reverse's).
    pub id: String,
    pub state: Outcome,
    /// The topology version that recorded this outcome.
    pub version: u64,
    /// When it was recorded, in Unix seconds.
    pub at: u64,
    /// The reshard that moved writes back after a cancel (`reverts` names
    /// `id` while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_by: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The verification of a finished (or failed) reshard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verified: Vec<Verified>,
}

/// How a reshard ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Copied, verified, the sources cleaned; the final topology published.
    Done,
    /// Cancelled while copying; the copies were undone and the reverse
    /// reshard moved new writes back.
    Cancelled,
    /// The verification found the copies unequal to the sources: the
    /// driver stops (nothing is cleaned up) and the migration stays,
    /// reads stay exact across both owners, until a cancel rolls it back
    /// (the outcome stays `failed`, with `reverted_by`).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// Credentials of the admin user (see [`TopologyDoc::admin`]). The host,
/// port and database are each server's own, from its DSN. At most one of
/// `password`, `password_file` and `password_env`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AdminUser {
    /// A MariaDB account name, 1 to 80 characters.
    #[serde(default)]
    pub user: String,
    /// Shown as `***`; a `***` sent back keeps the running password. In a
    /// validated [`Topology`] whose admin user names `password_file` or
    /// `password_env`, the secret read from there (never persisted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// An absolute path on each proxy's host whose content (without one
    /// trailing newline) is the password, read on every topology change,
    /// reload and start. Persisted and shown as the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// The name of an environment variable of each proxy holding the
    /// password. Persisted and shown as the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
}

impl AdminUser {
    /// `dsn` with these credentials instead of its own.
    pub fn on(&self, dsn: &Dsn) -> Dsn {
        Dsn {
            user: self.user.clone(),
            password: self.password.clone(),
            secret: self.secret(),
            ..dsn.clone()
        }
    }

    /// The reference the password comes from, if not written inline.
    pub fn secret(&self) -> Option<Secret> {
        Secret::from_fields(self.password_file.as_deref(), self.password_env.as_deref())
    }

    /// The document form: a reference as written, an inline password in
    /// clear or as `***`.
    fn to_doc(&self, redact: bool) -> AdminUser {
        let inline = self.secret().is_none();
        AdminUser {
            user: self.user.clone(),
            password: self.password.as_ref().filter(|_| inline).map(|p| {
                if redact {
                    crate::dsn::REDACTED.to_owned()
                } else {
                    p.clone()
                }
            }),
            password_file: self.password_file.clone(),
            password_env: self.password_env.clone(),
        }
    }
}

/// Never shows a password, inline or read from a reference.
impl std::fmt::Debug for AdminUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminUser")
            .field("user", &self.user)
            .field(
                "password",
                &self.password.as_ref().map(|_| crate::dsn::REDACTED),
            )
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .finish()
    }
}

/// A reshard in progress, carried inside the topology so that every proxy
/// (through the file or the shared store) routes, reads and resumes from the
/// same persisted state.
///
/// While it is present, writes follow the ring of the topology's groups (the
/// *new* ring) and reads of a key whose owner differs on the *previous* ring
/// (`from_vnodes`, `from_weights`) also consult the previous owner until the
/// key's range has been copied. Groups being removed stay in `groups` with
/// weight 0: they are off the new ring but still readable and copyable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Migration {
    /// Names the reshard in copy markers; unique per reshard.
    pub id: String,
    pub phase: Phase,
    /// The first topology version that routes writes by the new ring.
    pub since: u64,
    pub from_vnodes: u32,
    /// The previous ring: group name → weight (all above 0).
    pub from_weights: BTreeMap<String, u32>,
    /// Set on the reshard that undoes a cancelled one: its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<String>,
    /// Per source → target pair, what the verification found (filled when
    /// the reshard enters `cleaning`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verified: Vec<Verified>,
}

/// Where a reshard is. The order is the only order it moves in, except that
/// `copying` may turn into `cancelling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Writes go to the new owners; moved ranges are being copied.
    Copying,
    /// Copies are being undone before the reverse reshard starts.
    Cancelling,
    /// Copies verified; the sources' moved rows are being deleted.
    Cleaning,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Cancelling => "cancelling",
            Phase::Cleaning => "cleaning",
        }
    }
}

/// A VDiff-like check of one source → target pair: what the source holds in
/// the moved ranges equals what arrived on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Verified {
    pub source: String,
    pub target: String,
    /// Counters (total rows) and the sum of their totals, on the source.
    pub source_counters: u64,
    pub source_sum: i64,
    /// The same, as recorded by the copy transactions on the target.
    pub copied_counters: u64,
    pub copied_sum: i64,
}

impl Verified {
    pub fn ok(&self) -> bool {
        self.source_counters == self.copied_counters && self.source_sum == self.copied_sum
    }
}

/// One group as written in the document; DSNs are still text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupDoc {
    /// `[a-z0-9_-]{1,64}`, unique.
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_weight")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000))]
    pub weight: u32,
    /// `mysql://user:pass@host:port/db`; the server shows passwords as
    /// `***`, and a `***` sent back keeps the running password. Instead of
    /// an inline password, `?password_file=/abs/path` (the file's content
    /// without one trailing newline, on each proxy's host) or
    /// `?password_env=NAME` (a variable of each proxy): read on every
    /// topology change, reload and start; persisted and shown as written.
    #[serde(default)]
    pub master: String,
    #[serde(default)]
    pub replicas: Vec<String>,
}

fn default_vnodes() -> u32 {
    DEFAULT_VNODES
}

fn default_weight() -> u32 {
    1
}

/// A validated topology. Group order is the document's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub version: u64,
    pub vnodes: u32,
    pub groups: Vec<GroupSpec>,
    pub migration: Option<Migration>,
    pub admin: Option<AdminUser>,
    pub last_reshard: Option<LastReshard>,
}

/// A validated group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: String,
    pub weight: u32,
    pub master: Dsn,
    pub replicas: Vec<Dsn>,
}

impl TopologyDoc {
    /// Parses YAML (JSON is YAML too), reporting unknown keys, type errors and
    /// validation problems together.
    pub fn parse_and_validate(text: &str) -> Result<Topology, Invalid> {
        let mut problems = Problems::new();
        let doc: TopologyDoc = yaml::parse(text, &mut problems)?;
        match doc.validate() {
            Ok(t) => problems.finish(t),
            Err(invalid) => {
                problems.extend(invalid);
                problems.fail()
            }
        }
    }

    /// Checks every rule of SPEC §4 and returns all violations at once.
    pub fn validate(&self) -> Result<Topology, Invalid> {
        let mut problems = Problems::new();
        if self.vnodes == 0 || self.vnodes > MAX_VNODES {
            problems.push(
                "vnodes",
                format!("must be 1..={MAX_VNODES}, got {}", self.vnodes),
            );
        }
        if self.groups.is_empty() {
            problems.push("groups", "at least one group is required");
        }
        let mut names = BTreeSet::new();
        // Server address -> where it was first seen, to catch one server in two places.
        let mut servers: BTreeMap<String, String> = BTreeMap::new();
        let mut groups = Vec::with_capacity(self.groups.len());
        for (i, g) in self.groups.iter().enumerate() {
            let at = format!("groups[{i}]");
            if !valid_group_name(&g.name) {
                problems.push(
                    format!("{at}.name"),
                    format!("{:?} must match [a-z0-9_-]{{1,64}}", g.name),
                );
            } else if !names.insert(g.name.clone()) {
                problems.push(
                    format!("{at}.name"),
                    format!("duplicate group name {:?}", g.name),
                );
            }
            // Weight 0 means "off the ring, still a reshard source": only
            // a group the running reshard moves data out of may have it.
            let draining = g.weight == 0
                && self
                    .migration
                    .as_ref()
                    .is_some_and(|m| m.from_weights.contains_key(&g.name));
            if (g.weight == 0 && !draining) || g.weight > MAX_WEIGHT {
                problems.push(
                    format!("{at}.weight"),
                    format!("must be 1..={MAX_WEIGHT}, got {}", g.weight),
                );
            }
            let mut check_dsn = |path: String, text: &str| -> Option<Dsn> {
                match Dsn::parse(text) {
                    Ok(dsn) => {
                        if let Some(first) = servers.insert(dsn.addr(), path.clone()) {
                            problems.push(
                                &path,
                                format!("server {} is already used at {first}", dsn.addr()),
                            );
                        }
                        Some(dsn)
                    }
                    Err(why) if text.is_empty() => {
                        problems.push(path, format!("a DSN is required ({why})"));
                        None
                    }
                    Err(why) => {
                        problems.push(path, format!("invalid DSN: {why}"));
                        None
                    }
                }
            };
            let master = check_dsn(format!("{at}.master"), &g.master);
            let replicas: Vec<Option<Dsn>> = g
                .replicas
                .iter()
                .enumerate()
                .map(|(j, r)| check_dsn(format!("{at}.replicas[{j}]"), r))
                .collect();
            if let (Some(master), Some(replicas)) =
                (master, replicas.into_iter().collect::<Option<Vec<_>>>())
            {
                groups.push(GroupSpec {
                    name: g.name.clone(),
                    weight: g.weight,
                    master,
                    replicas,
                });
            }
        }
        if !self.groups.is_empty() && self.groups.iter().all(|g| g.weight == 0) {
            problems.push("groups", "at least one group needs a weight above 0");
        }
        if let Some(m) = &self.migration {
            check_migration(m, &names, &mut problems);
        }
        if let Some(a) = &self.admin {
            check_admin_user(a, &mut problems);
        }
        if let Some(last) = &self.last_reshard {
            check_last_reshard(last, &mut problems);
        }
        problems.finish(Topology {
            version: self.version,
            vnodes: self.vnodes,
            groups,
            migration: self.migration.clone(),
            admin: self.admin.clone(),
            last_reshard: self.last_reshard.clone(),
        })
    }
}

impl Topology {
    /// The document form. With `redact`, inline passwords read `***` (for
    /// display); without, the document can be persisted and parsed back
    /// unchanged. Passwords read from a `password_file` or `password_env`
    /// are never in it, only their references.
    pub fn to_doc(&self, redact: bool) -> TopologyDoc {
        let show = |d: &Dsn| if redact { d.redacted() } else { d.expose() };
        TopologyDoc {
            version: self.version,
            vnodes: self.vnodes,
            migration: self.migration.clone(),
            last_reshard: self.last_reshard.clone(),
            admin: self.admin.as_ref().map(|a| a.to_doc(redact)),
            groups: self
                .groups
                .iter()
                .map(|g| GroupDoc {
                    name: g.name.clone(),
                    weight: g.weight,
                    master: show(&g.master),
                    replicas: g.replicas.iter().map(show).collect(),
                })
                .collect(),
        }
    }

    /// The YAML persisted to the topology file (real inline passwords;
    /// references, not the secrets they point to).
    pub fn to_yaml(&self) -> String {
        yaml::to_string(&self.to_doc(false))
    }

    /// Reads the password of every DSN and of the admin user that names a
    /// `password_file` or `password_env`, reporting every one that cannot
    /// be read (by path or variable, never quoting a secret). A reference
    /// that `keep` (the running topology) also uses takes its password
    /// from there instead of being read again; `None` reads them all.
    ///
    /// Not part of [`TopologyDoc::validate`]: `tallyctl` validates a
    /// document away from the proxy's host, where the files and variables
    /// are not.
    pub fn resolve_secrets(&mut self, keep: Option<&Topology>) -> Result<(), Invalid> {
        let mut known: Vec<(Secret, String)> = Vec::new();
        if let Some(running) = keep {
            let dsns = running
                .groups
                .iter()
                .flat_map(|g| std::iter::once(&g.master).chain(&g.replicas));
            for (secret, password) in dsns.map(|d| (d.secret.clone(), d.password.clone())).chain(
                running
                    .admin
                    .iter()
                    .map(|a| (a.secret(), a.password.clone())),
            ) {
                if let (Some(s), Some(p)) = (secret, password) {
                    known.push((s, p));
                }
            }
        }
        // Each reference is read once per change, so every server naming
        // it gets the same password.
        let mut read = |secret: &Secret| -> Result<String, String> {
            if let Some((_, p)) = known.iter().find(|(s, _)| s == secret) {
                return Ok(p.clone());
            }
            let p = secret.read()?;
            known.push((secret.clone(), p.clone()));
            Ok(p)
        };
        let mut problems = Problems::new();
        for (i, g) in self.groups.iter_mut().enumerate() {
            let dsns = std::iter::once((format!("groups[{i}].master"), &mut g.master)).chain(
                g.replicas
                    .iter_mut()
                    .enumerate()
                    .map(|(j, r)| (format!("groups[{i}].replicas[{j}]"), r)),
            );
            for (path, dsn) in dsns {
                if let Some(secret) = &dsn.secret {
                    match read(secret) {
                        Ok(p) => dsn.password = Some(p),
                        Err(why) => problems.push(path, why),
                    }
                }
            }
        }
        if let Some(a) = self.admin.as_mut()
            && let Some(secret) = a.secret()
        {
            match read(&secret) {
                Ok(p) => a.password = Some(p),
                Err(why) => problems.push(format!("admin.{}", secret.key()), why),
            }
        }
        problems.finish(())
    }

    pub fn group(&self, name: &str) -> Option<&GroupSpec> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The connection for administrative work on the server of `dsn`: the
    /// admin user when the topology names one, else the DSN itself.
    pub fn admin_dsn(&self, dsn: &Dsn) -> Dsn {
        self.admin
            .as_ref()
            .map_or_else(|| dsn.clone(), |a| a.on(dsn))
    }
}

fn check_admin_user(a: &AdminUser, problems: &mut Problems) {
    if a.user.is_empty() || a.user.chars().count() > 80 {
        problems.push("admin.user", "must be 1 to 80 characters");
    } else if a.user.chars().any(char::is_control) {
        problems.push("admin.user", "must not contain control characters");
    }
    let given: Vec<&str> = [
        a.password.as_ref().map(|_| "password"),
        a.password_file.as_ref().map(|_| "password_file"),
        a.password_env.as_ref().map(|_| "password_env"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() > 1 {
        problems.push(
            format!("admin.{}", given[1]),
            format!("{} are exclusive: give one", given.join(" and ")),
        );
    }
    if let Some(secret) = a.secret()
        && let Err(why) = secret.check()
    {
        problems.push(format!("admin.{}", secret.key()), why);
    }
}

fn check_last_reshard(last: &LastReshard, problems: &mut Problems) {
    if last.id.is_empty() || last.id.len() > 64 {
        problems.push("last_reshard.id", "must be 1 to 64 characters");
    }
    if last
        .reverted_by
        .as_ref()
        .is_some_and(|r| r.is_empty() || r.len() > 64)
    {
        problems.push("last_reshard.reverted_by", "must be 1 to 64 characters");
    }
}

fn check_migration(m: &Migration, names: &BTreeSet<String>, problems: &mut Problems) {
    if m.id.is_empty() || m.id.len() > 64 {
        problems.push("migration.id", "must be 1 to 64 characters");
    }
    if m.from_vnodes == 0 || m.from_vnodes > MAX_VNODES {
        problems.push(
            "migration.from_vnodes",
            format!("must be 1..={MAX_VNODES}, got {}", m.from_vnodes),
        );
    }
    if m.from_weights.is_empty() {
        problems.push("migration.from_weights", "the previous ring needs a group");
    }
    for (name, w) in &m.from_weights {
        if !names.contains(name) {
            problems.push(
                format!("migration.from_weights.{name}"),
                "a group of the previous ring must stay in groups until the reshard is done",
            );
        }
        if *w == 0 || *w > MAX_WEIGHT {
            problems.push(
                format!("migration.from_weights.{name}"),
                format!("must be 1..={MAX_WEIGHT}, got {w}"),
            );
        }
    }
}

fn valid_group_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
version: 3
vnodes: 160
groups:
  - name: g0
    weight: 1
    master: mysql://root@127.0.0.1:3307/tally
    replicas:
      - mysql://root@127.0.0.1:3308/tally
  - name: g1
    master: mysql://app:pw@127.0.0.1:3309/tally
";

    #[test]
    fn parses_a_valid_topology_with_defaults() {
        let t = TopologyDoc::parse_and_validate(GOOD).expect("valid");
        assert_eq!(t.version, 3);
        assert_eq!(t.groups.len(), 2);
        assert_eq!(t.groups[1].weight, 1, "weight defaults to 1");
        assert_eq!(t.groups[0].replicas[0].port, 3308);
        // Persisted YAML round-trips with real passwords; display redacts.
        let again = TopologyDoc::parse_and_validate(&t.to_yaml()).expect("round trip");
        assert_eq!(again, t);
        assert_eq!(
            t.to_doc(true).groups[1].master,
            "mysql://app:***@127.0.0.1:3309/tally"
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let bad = "
vnodes: 0
colour: blue
groups:
  - name: G0
    weight: 0
    master: mysql://root@127.0.0.1:3307/tally
  - name: g1
    master: mysql://root@127.0.0.1:3307/tally
    replicas: [ 'http://x' ]
  - name: g1
    master: ''
";
        let err = TopologyDoc::parse_and_validate(bad).expect_err("invalid");
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "colour",
                "vnodes",
                "groups[0].name",
                "groups[0].weight",
                "groups[1].master",
                "groups[1].replicas[0]",
                "groups[2].name",
                "groups[2].master",
            ],
            "{err}"
        );
        assert!(err.to_string().starts_with("8 problems"), "{err}");
    }

    #[test]
    fn empty_topology_needs_a_group() {
        let err = TopologyDoc::parse_and_validate("version: 1\n").expect_err("no groups");
        assert_eq!(err.problems[0].path, "groups");
    }

    /// Issue #20 item 6: no problem quotes a password, whether the DSN
    /// does not decode or sits where the document wants something else
    /// (one replica written without a list: the YAML error quotes it).
    #[test]
    fn problems_never_quote_a_password() {
        for bad in [
            "groups:\n  - name: g0\n    master: mysql://app:s3cret%FF@127.0.0.1:3307/tally\n",
            "groups:\n  - name: g0\n    master: mysql://app:pw@127.0.0.1:3307/tally\n    replicas: mysql://app:s3cret@127.0.0.1:3308/tally\n",
            "groups:\n  - name: g0\n    master: [mysql://app:s3cret@127.0.0.1:3307/tally]\n",
        ] {
            let err = TopologyDoc::parse_and_validate(bad).expect_err(bad);
            let text = format!("{err} {err:?}");
            assert!(!text.contains("s3cret"), "{text}");
        }
    }

    #[test]
    fn structurally_wrong_yaml_is_one_clear_problem() {
        let err = TopologyDoc::parse_and_validate("groups: 7").expect_err("wrong type");
        assert_eq!(err.problems.len(), 1);
        assert!(
            err.problems[0].message.contains("cannot parse YAML"),
            "{err}"
        );
    }

    /// Issue #23 item 2: passwords from files and environment variables.
    /// The document round-trips with the references; resolving reads the
    /// secrets into the topology (for connections) and nothing persisted
    /// or shown carries them.
    #[test]
    fn secret_references_round_trip_and_resolve_without_leaking() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("db.pw").display().to_string();
        let admin_file = dir.path().join("admin.pw").display().to_string();
        std::fs::write(&file, "s3cret-data\n").expect("write");
        std::fs::write(&admin_file, "s3cret-admin").expect("write");
        // Without `unsafe` (`set_var`): a variable every test run has.
        let var = "PATH";
        let path_value = std::env::var(var).expect("PATH is set");
        let text = format!(
            "groups:
  - name: g0
    master: mysql://tally@127.0.0.1:3307/tally?password_file={file}
    replicas:
      - mysql://tally@127.0.0.1:3308/tally?password_env={var}
  - name: g1
    master: mysql://app:inline@127.0.0.1:3309/tally
admin:
  user: tally_admin
  password_file: {admin_file}
"
        );
        let parsed = TopologyDoc::parse_and_validate(&text).expect("valid");
        assert_eq!(
            parsed.groups[0].master.password, None,
            "not read by validate"
        );
        let yaml = parsed.to_yaml();
        assert_eq!(
            TopologyDoc::parse_and_validate(&yaml).expect("round trip"),
            parsed
        );
        let mut t = parsed.clone();
        t.resolve_secrets(None).expect("readable");
        assert_eq!(t.groups[0].master.password.as_deref(), Some("s3cret-data"));
        assert_eq!(
            t.groups[0].replicas[0].password.as_deref(),
            Some(path_value.as_str())
        );
        assert_eq!(t.groups[1].master.password.as_deref(), Some("inline"));
        let admin = t.admin_dsn(&t.groups[0].replicas[0]);
        assert_eq!(admin.user, "tally_admin");
        assert_eq!(admin.password.as_deref(), Some("s3cret-admin"));
        assert_eq!(admin.addr(), "127.0.0.1:3308");
        // Persisted and shown: the references, as parsed; never a secret.
        assert_eq!(t.to_yaml(), yaml);
        assert_eq!(t.to_doc(false), parsed.to_doc(false));
        let shown = serde_json::to_string(&t.to_doc(true)).expect("json");
        for out in [t.to_yaml(), shown.clone(), format!("{t:?}")] {
            assert!(
                !out.contains("s3cret") && !out.contains(&path_value),
                "{out}"
            );
        }
        assert!(shown.contains(&format!("password_file={file}")), "{shown}");
        assert!(shown.contains(&admin_file), "{shown}");
        assert!(
            !shown.contains("inline") && shown.contains("app:***@"),
            "{shown}"
        );
        // Resolved again (a reload) equals; with `keep`, a file that is
        // gone now is not read again.
        let mut again = parsed.clone();
        again.resolve_secrets(None).expect("readable");
        assert_eq!(again, t);
        std::fs::remove_file(&file).expect("rm");
        let mut kept = parsed.clone();
        kept.resolve_secrets(Some(&t)).expect("kept");
        assert_eq!(kept, t);
        // A rotated file is picked up by the next resolve.
        std::fs::write(&file, "s3cret-rotated\n").expect("write");
        let mut rotated = parsed.clone();
        rotated.resolve_secrets(None).expect("readable");
        assert_eq!(
            rotated.groups[0].master.password.as_deref(),
            Some("s3cret-rotated")
        );
        assert_ne!(rotated, t, "a rotated secret is a change (new pools)");
    }

    #[test]
    fn unreadable_secrets_are_problems_naming_the_reference() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pw").display().to_string();
        let var = "TALLY_TOPOLOGY_TEST_UNSET_5e0b";
        let text = format!(
            "groups:
  - name: g0
    master: mysql://tally@127.0.0.1:3307/tally?password_file={missing}
    replicas: [ 'mysql://tally@127.0.0.1:3308/tally?password_env={var}' ]
admin: {{ user: tally_admin, password_env: {var} }}
"
        );
        let mut t = TopologyDoc::parse_and_validate(&text).expect("valid form");
        let err = t.resolve_secrets(None).expect_err("unreadable");
        let found: Vec<(&str, &str)> = err
            .problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(found.len(), 3, "{err}");
        assert_eq!(found[0].0, "groups[0].master");
        assert!(found[0].1.contains(&missing), "{err}");
        assert_eq!(found[1].0, "groups[0].replicas[0]");
        assert_eq!(found[1].1, format!("environment variable {var} is not set"));
        assert_eq!(found[2].0, "admin.password_env");
    }

    #[test]
    fn the_admin_password_sources_are_exclusive_and_checked() {
        for (admin, path, why) in [
            (
                "{ user: a, password: s3cret, password_file: /p }",
                "admin.password_file",
                "exclusive",
            ),
            (
                "{ user: a, password_file: /p, password_env: X }",
                "admin.password_env",
                "exclusive",
            ),
            (
                "{ user: a, password_file: p }",
                "admin.password_file",
                "absolute",
            ),
            (
                "{ user: a, password_env: 'A B' }",
                "admin.password_env",
                "variable name",
            ),
        ] {
            let text = format!(
                "groups:\n  - name: g0\n    master: mysql://t@127.0.0.1:3307/tally\nadmin: {admin}\n"
            );
            let err = TopologyDoc::parse_and_validate(&text).expect_err(admin);
            assert_eq!(err.problems.len(), 1, "{admin}: {err}");
            assert_eq!(err.problems[0].path, path, "{admin}: {err}");
            assert!(err.problems[0].message.contains(why), "{admin}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        // DSN problems name the DSN's place.
        let err = TopologyDoc::parse_and_validate(
            "groups:\n  - name: g0\n    master: mysql://t:s3cret@127.0.0.1:3307/tally?password_env=X\n",
        )
        .expect_err("exclusive");
        assert_eq!(err.problems[0].path, "groups[0].master");
        assert!(!format!("{err} {err:?}").contains("s3cret"), "{err}");
    }
}
