"""The persistent image index: scalable search (search.py), the index folder (store.py),
position estimates (locate.py) and hloc interop (hloc_export.py)."""
