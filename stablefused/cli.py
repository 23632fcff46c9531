"""``python -m stablefused plugins [kind]``: every plugin with its kind, name, parameters and doc."""

from __future__ import annotations

from stablefused import registry


def print_plugins(kind: str | None = None) -> None:
    if kind is not None and kind not in registry.KINDS:
        raise SystemExit(f"error: unknown plugin kind {kind!r}; kinds are: {', '.join(registry.KINDS)}")
    for info in registry.list_plugins(kind):
        params = ", ".join(f"{k}={v!r}" for k, v in info.params.items()) or "-"
        print(f"{info.kind:<18} {info.name:<22} {params}\n{'':<18} {info.doc}")
