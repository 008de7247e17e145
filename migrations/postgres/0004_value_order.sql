-- Which of two IPNS records of one name wins (higher sequence, then later validity), so the
-- upsert can refuse a regression. NULL for /pk/ records and rows written before this migration.
-- Nullable columns without a default: a catalogue-only change, and a previous version's
-- statements keep working on this schema (rolling upgrades).
ALTER TABLE value_records ADD COLUMN IF NOT EXISTS seq bigint;
ALTER TABLE value_records ADD COLUMN IF NOT EXISTS eol_ms bigint;
