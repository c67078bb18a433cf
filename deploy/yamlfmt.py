"""YAML as people write it, for the generated deploy files: keys in the order given, nested lists
indented, multi-line strings as `|` blocks (serveConfigV2 stays a readable document inside the
manifest), no anchors or aliases (a shared dict is written out each time)."""

from __future__ import annotations

from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(*docs: Any) -> str:
    """One YAML document per argument, in the order given."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)
