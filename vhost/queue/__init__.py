"""Virtqueues: one interface (:mod:`.base`), a layout per module (:mod:`.split`, :mod:`.packed`),
and the in-flight area each layout keeps for crash recovery (:mod:`.inflight` for the shared
area and the split regions, :mod:`.inflight_packed` for the packed ones)."""
