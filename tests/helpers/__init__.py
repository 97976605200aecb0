"""Test builders (not tests): upstream models and checkpoints (upstream), the dense reference losses
(loss_reference), a live server and its inputs (server_utils). tests/conftest.py puts tests/ on sys.path,
so test modules import them as ``from helpers.upstream import ...``."""
