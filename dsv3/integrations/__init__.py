"""Adapters that put dsv3's kernels under other libraries' models.

Each integration lives in its own subpackage and imports its library only when the
subpackage itself is imported, so ``import dsv3`` never pulls in transformers:

    import dsv3.integrations.transformers  # registers experts_implementation="dsv3"
"""
