"""CPU benchmarks of the dsv3 MoE layer against its peers and the dense bound.

``python -m benchmarks.run`` (``make bench``) times every provider with
pytest-benchmark, measures each one's peak extra memory in a fresh process and
prints the ratio table; ``benchmarks/RESULTS.md`` keeps the recorded runs.
The suite lives outside ``tests/`` so ``make test`` never pays for it.
"""
