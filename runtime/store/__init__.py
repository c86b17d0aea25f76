"""The expert store: routed experts read from a pack's layer files into slabs; cache policies, the prefill
ring, huge pages. Imports nothing of the model (docs/architecture.md)."""
