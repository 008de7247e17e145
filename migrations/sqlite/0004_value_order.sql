-- Which of two IPNS records of one name wins (higher sequence, then later validity), so the
-- upsert can refuse a regression. NULL for /pk/ records and rows written before this migration.
-- Nullable columns: a previous version's statements keep working on this schema.
ALTER TABLE value_records ADD COLUMN seq INTEGER;
ALTER TABLE value_records ADD COLUMN eol_ms INTEGER;
