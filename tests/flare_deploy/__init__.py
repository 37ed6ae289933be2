"""Deployment tests: a package, so the tests import their helpers as ``.deploy_support`` (pytest runs in importlib mode)."""
