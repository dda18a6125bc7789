"""Backbones: networks adapted to the TwinFlow protocol ``F(x_t, t, tt, cond) -> velocity``.

Kept import-light: each backbone lives in its own subpackage and is imported on demand.
"""
