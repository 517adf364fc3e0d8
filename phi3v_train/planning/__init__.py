"""Planning: model FLOP counts (and what fits where)."""
