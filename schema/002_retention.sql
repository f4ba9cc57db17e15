-- Retention deletes expired buckets across every counter
-- (`DELETE ... WHERE bucket < ? LIMIT n`); these indexes make that a range
-- scan instead of a table scan. The minute table's expired rows are found
-- per namespace through `by_bucket` instead (since schema version 3, see
-- 009_lean_minute.sql: every flush inserts into each index of that table).
CREATE INDEX IF NOT EXISTS by_age ON counter_hour (bucket);
CREATE INDEX IF NOT EXISTS by_age ON counter_day (bucket);
