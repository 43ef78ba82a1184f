"""Where weights live: flat per-dtype arenas and their layout (arena), the population's tiers behind one interface
(population), staging of chunks between tiers and devices (staging), one population per node (node_share)."""
