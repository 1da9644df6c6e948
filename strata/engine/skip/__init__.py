"""AdaSkip: adaptive sublayer skipping (offline calibration, fixed sets, per-request online step).

See docs/adaskip.md. The pieces, one per module: `corpus` (default calibration text),
`calibrate` (offline IO-similarity statistics), `profile` (the per-model result file),
`skip_set` (what one request skips), `policy` (AdaSkip and the baselines), `plan` (per-row
SkipPlan for one batched forward), `request_state` (one request's modes and online step).
"""
