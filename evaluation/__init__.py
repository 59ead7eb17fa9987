"""Metrics usable on any adapter: held-out loss and exact match per domain."""
