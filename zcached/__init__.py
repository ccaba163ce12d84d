"""zcached: a userspace compressed swap device (the userspace sibling of kernel zram)."""

__version__ = "0.1.0"
