"""Parallelism applied to a model chunk by functions that take the chunk, a 1-D submesh and plain values.
Fixed order (runtime/launch.py): pipeline split, (fp8,) tensor parallel, context parallel, recomputation, compile,
data parallel (the ZeRO stage)."""
