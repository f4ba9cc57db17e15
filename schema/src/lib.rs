//! The SQL schema of tally's shard tables.
//!
//! The `.sql` files in `schema/` are the source of truth; this crate embeds
//! them so the proxy (at start and when a master joins) and the test harness
//! apply exactly the same text. Every statement is idempotent
//! (`CREATE TABLE IF NOT EXISTS`), so applying the schema twice is harmless.
#![forbid(unsafe_code)]

/// The schema files in the order they are applied: `(file name, SQL text)`.
pub const FILES: &[(&str, &str)] = &[
    ("001_counters.sql", include_str!("../001_counters.sql")),
    ("002_retention.sql", include_str!("../002_retention.sql")),
    ("003_reshard.sql", include_str!("../003_reshard.sql")),
    ("004_wal.sql", include_str!("../004_wal.sql")),
    ("005_quarantine.sql", include_str!("../005_quarantine.sql")),
    ("006_ring_fence.sql", include_str!("../006_ring_fence.sql")),
    (
        "007_applied_ids.sql",
        include_str!("../007_applied_ids.sql"),
    ),
    ("008_rollup.sql", include_str!("../008_rollup.sql")),
    (
        "009_lean_minute.sql",
        include_str!("../009_lean_minute.sql"),
    ),
    ("010_id_sets.sql", include_str!("../010_id_sets.sql")),
    (
        "011_packed_sets.sql",
        include_str!("../011_packed_sets.sql"),
    ),
];

/// The storage layout these files create (`schema_version.version`): 2 is
/// minute and total rows written by flushes, hours and days rolled up
/// behind a watermark (`008_rollup.sql`); 3 the minute table without
/// `by_ring` and `by_age` (`009_lean_minute.sql`); 4 event ids kept as
/// sets, a row per request rather than per event (`010_id_sets.sql`); 5
/// the first events of requests with numbered keys packed a thousand to a
/// set (`011_packed_sets.sql`).
pub const VERSION: u32 = 5;

/// The topology store's schema (`schema/meta/`), applied to the store database.
pub const META_FILES: &[(&str, &str)] = &[
    ("meta/001_meta.sql", include_str!("../meta/001_meta.sql")),
    (
        "meta/002_settled.sql",
        include_str!("../meta/002_settled.sql"),
    ),
];

/// Every statement of the topology store's schema.
pub fn meta_statements() -> Vec<String> {
    META_FILES
        .iter()
        .flat_map(|(_, sql)| split_statements(sql))
        .collect()
}

/// Every statement of every schema file, in order, without comments.
///
/// The files use `;` only as a statement terminator and `--` only for
/// line comments, which is what this simple splitter relies on.
pub fn statements() -> Vec<String> {
    FILES
        .iter()
        .flat_map(|(_, sql)| split_statements(sql))
        .collect()
}

fn split_statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .map(|line| match line.find("--") {
            // A `--` inside a quoted COMMENT would be cut too; the files avoid it.
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The database-independent statement that creates the database itself.
/// `name` must already be validated as an identifier (`[A-Za-z0-9_]+`).
pub fn create_database(name: &str) -> String {
    format!("CREATE DATABASE IF NOT EXISTS `{name}`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_every_table_and_strips_comments() {
        let stmts = statements();
        assert_eq!(stmts.len(), 28, "{stmts:#?}");
        for stmt in &stmts {
            // Idempotent: creations, inserts that keep a present row, and
            // an update of a value that is still unset.
            assert!(
                stmt.starts_with("CREATE TABLE IF NOT EXISTS")
                    || stmt.starts_with("CREATE INDEX IF NOT EXISTS")
                    || stmt.starts_with("INSERT IGNORE INTO")
                    || stmt.starts_with("DROP INDEX IF EXISTS")
                    || stmt.starts_with("ALTER TABLE id_sets_state\n    ADD COLUMN IF NOT EXISTS")
                    || (stmt.starts_with("UPDATE id_sets_state")
                        && stmt.ends_with("AND packed_at IS NULL"))
                    || (stmt.starts_with("INSERT INTO")
                        && stmt.contains("ON DUPLICATE KEY UPDATE")),
                "{stmt}"
            );
            assert!(!stmt.contains("--"), "{stmt}");
        }
        assert!(stmts.iter().any(|s| s.contains("applied_batches")));
        assert!(stmts.iter().any(|s| s.contains("reshard_chunks")));
        assert!(stmts.iter().any(|s| s.contains("quarantine")));
        assert!(stmts.iter().any(|s| s.contains("ring_fence")));
        assert!(stmts.iter().any(|s| s.contains("applied_ids")));
        assert!(stmts.iter().any(|s| s.contains("rollup_state")));
        assert!(stmts.iter().any(|s| s.contains("packed_at")));
        assert!(
            stmts
                .iter()
                .any(|s| s.contains(&format!("VALUES (1, {VERSION})")))
        );
        let meta = meta_statements();
        assert_eq!(meta.len(), 4, "{meta:#?}");
        assert!(meta.iter().all(|s| {
            s.starts_with("CREATE TABLE IF NOT EXISTS")
                || s.starts_with("ALTER TABLE proxies ADD COLUMN IF NOT EXISTS")
        }));
    }
}
