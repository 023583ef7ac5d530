"""Stage 3, the rewrite: the plan (which channels leave), the pruned and the masked model, constant
channels at linear heads, the pruned == masked contract (DESIGN.md 2), and `Pruner`, which runs
graph -> select -> rewrite once per model and prunes at any keep.

Takes a `ChannelGraph` and a `Selection`; gives ModelProtos and the JSON report. Imports `select`, `graph`, `io`.
"""
