-- The newest topology version whose routing change this proxy has settled:
-- every event it accepted under an older ring is committed. A reshard copies
-- a moved range only once every live proxy has settled the version that
-- moved it, so no late write can land on the old owner after the copy.
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS settled BIGINT UNSIGNED NOT NULL DEFAULT 0;
