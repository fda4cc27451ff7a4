"""The floor every layer may stand on, which imports nothing of diffopt: ``files`` (atomic
writes, JSON reads that name the file), ``validation`` (argument checks that name the
option) and ``plugins`` (registries' imports, entry points, ``--plugin``)."""
