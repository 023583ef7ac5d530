"""Stage 2, selection: operator norms of every kernel (BN folded in), then which kernels to keep: LEAN's
longest chains, the sv/l1 baselines, redundancy pruning, and the `Selection` object.

Takes a `ChannelGraph`; gives a `Selection` (edge keep mask, per-layer masks, statistics). Imports `graph`.
"""
