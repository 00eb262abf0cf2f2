"""Imported first by every benchmark script, before torch loads: no busy-waiting OpenMP threads
on a shared machine, and no Hub access (the models come from PyPI packages)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
