"""Holds the ms-swift plugin file only (swift puts a plugin's folder first on ``sys.path``, so the
folder must not contain modules with common names like ``swift.py``)."""
