-- Each run of a process leases with a random token, so two live processes that share a node
-- name are told apart. NULL: released by a graceful shutdown, reclaimable by the same node name.
ALTER TABLE head_leases ADD COLUMN IF NOT EXISTS token text;
