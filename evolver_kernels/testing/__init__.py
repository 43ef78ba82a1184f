"""Builders for tests, benchmarks and demos: tiny models from configs (tiny_models) and synthetic populations
with memory samplers (synthetic). Nothing in the package proper imports these."""
