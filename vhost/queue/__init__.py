"""Virtqueues: one interface (:mod:`.base`), a layout per module (split, packed), and the
in-flight area each layout keeps for crash recovery (:mod:`.inflight`)."""
