-- Fair provider sampling (docs/decisions/2026-12-01-fair-provider-sampling.md). Each row carries a
-- random sort key, chosen by the writer when the row is first written and kept by refreshes; a
-- read takes the live rows that follow a random starting point in that order, wrapping around,
-- through an index on (key, sample_key): a popular key costs one short index range per read, not
-- a scan of its rows, and no provider is favoured by its peer ID.
--
-- A constant default is a catalogue-only change (no table rewrite). Rows written before this
-- migration, or by a previous version during a rolling upgrade, have 0 until their next refresh
-- gives them a random key (writers never choose 0). Refreshes leave a non-zero key unchanged, so
-- they stay HOT updates.
ALTER TABLE providers ADD COLUMN IF NOT EXISTS sample_key integer NOT NULL DEFAULT 0;
-- A large fleet table can be indexed beforehand without blocking writers (on each partition of a
-- partitioned table), and this statement then does nothing:
--   CREATE INDEX CONCURRENTLY providers_sample ON providers (key, sample_key);
CREATE INDEX IF NOT EXISTS providers_sample ON providers (key, sample_key);
