"""The benchmark harness of DESIGN §10; run with ``make bench``."""
