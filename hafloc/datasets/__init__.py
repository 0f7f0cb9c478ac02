"""Dataset readers: one ``Dataset`` abstraction (base.py), one reader per published layout,
``detect.load_dataset`` to pick the reader from a path."""
