-- When an operator last rewound the partition's recorded offset (`inventory-consumer replay`)
-- after its owner claimed it; NULL otherwise. `replay` moves the epoch on too, which fences the
-- owner's worker; the owner sees this column set, claims the partition again (which clears it)
-- and fetches again from the offset now recorded. A claim by another replica clears it as well:
-- that replica starts from the recorded offset anyway.
ALTER TABLE partition_owners ADD COLUMN rewound_at timestamptz;
