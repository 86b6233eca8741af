"""Use cases: one module per job the CLI calls (evaluate, purify, compare, audit, scan, train, inspect, demo).

- pipeline: evaluate, purify and compare (options -> data + subject -> method -> verdicts -> outputs)
- audit: many checkpoints in one process (`evaluate DIR`); audit_targets: which checkpoints, which shard
- scan: the scan use case; training: `bdclean train`; inspection: `bdclean inspect`; demo: `bdclean demo`

Nothing is re-exported here: each command imports its own use case, so a run loads only what it needs
(audit_targets is torch-free and is read before anything heavy).
"""
