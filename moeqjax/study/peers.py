"""Peer rows for the study: Qwix QAT (int4 / int8 weight rules) on the same model, if qwix is installed."""

from __future__ import annotations


def run_peer_rows(store, config, cfg, teacher, task, windows, st):
  store.data.setdefault("peers", {})
  try:
    import qwix  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    store.data["peers"]["qwix"] = {"error": "qwix is not installed (pip install -e .[peers])"}
    store.save()
    return
  store.data["peers"]["qwix"] = {"error": "qwix peer rows are not implemented yet"}
  store.save()
