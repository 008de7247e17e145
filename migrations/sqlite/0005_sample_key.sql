-- Fair provider sampling (docs/decisions/2026-12-01-fair-provider-sampling.md): a random sort key
-- per row, chosen when the row is first written and kept by refreshes; a read takes the live rows
-- after a random starting point in that order, wrapping around. 0 marks rows written before this
-- migration; their next refresh gives them a random key.
ALTER TABLE providers ADD COLUMN sample_key INTEGER NOT NULL DEFAULT 0;
CREATE INDEX providers_sample ON providers (key, sample_key);
