"""Benchmarks of zcached against kernel zram (run with `make bench`)."""
