"""Use cases: one module per job the CLI calls (evaluate, purify, compare, audit, scan, train, inspect, demo).

- evaluate, purify, compare: `bdclean evaluate CKPT`, `purify`, `compare` and `path`
- setup: what they all set up first (data, subject, trigger, clean set, output kind, memory format) and the
  provenance a written checkpoint carries; retuning: the retuning check as they run it
- audit: many checkpoints in one process (`evaluate DIR`); audit_targets: which checkpoints, which shard
- scan: the scan use case; training: `bdclean train`; inspection: `bdclean inspect`; demo: `bdclean demo`

Nothing is re-exported here: each command imports its own use case, so a run loads only what it needs
(audit_targets is torch-free and is read before anything heavy).
"""
