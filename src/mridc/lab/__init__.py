"""Evaluation library: metrics, classical codecs, datasets, provenance and the simulated edge (link, broker, fleet).

The benchmarks (mridc.bench) and the simulator (mridc.firmware_sim) are thin applications over this package; it
imports neither of them, and they never import each other.
"""
