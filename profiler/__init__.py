"""Per-unit compute timing and a fitted communication model for the scheduler.

This package is filled by the profiler work (per-unit forward/backward times measured with
hooks, an alpha-beta fit of all-reduce time on the live process group, and the versioned
``Profile`` type). It exists now so the package layout, and its install, are final.
"""
