"""The tile-work engine: per-tile work (read, segment, keep owned cells, describe, write) and its executors.

Shared by every run that segments tiles (the sampled run, the 100% run) and by every executor, so the
pipeline folders hold only nodes and wiring.
"""
