-- Schema version 3 (issue #21, keys chosen by measurement): the minute
-- table, the one every flush inserts into, keeps only the indexes a query
-- needs: its primary key (point and range reads of a counter) and
-- `by_bucket` (top-K over a range, and per namespace: retention, the
-- rollup's hour sums). `by_ring` went: a reshard reaches a range's minute
-- rows through `counter_total` (`by_ring` there), since every counter with
-- a minute row has a total row (a flush writes it even when the deltas sum
-- to zero). `by_age` went: retention and the rollup scan per namespace.
-- Measured: 100,000 counter-minutes (minute and total upserts) load 1.2-1.3x
-- faster without the two (BENCHMARKS.md, #21).
--
-- Dropping an index is an in-place change in MariaDB (no table copy). A
-- database created since has neither (001 and 002 no longer create them).
DROP INDEX IF EXISTS by_ring ON counter_minute;
DROP INDEX IF EXISTS by_age ON counter_minute;
INSERT INTO schema_version (id, version) VALUES (1, 3)
    ON DUPLICATE KEY UPDATE version = GREATEST(version, 3);
