-- Retention deletes expired buckets across every counter
-- (`DELETE ... WHERE bucket < ? LIMIT n`); these indexes make that a range
-- scan instead of a table scan.
CREATE INDEX IF NOT EXISTS by_age ON counter_minute (bucket);
CREATE INDEX IF NOT EXISTS by_age ON counter_hour (bucket);
CREATE INDEX IF NOT EXISTS by_age ON counter_day (bucket);
