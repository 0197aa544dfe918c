"""A fast YAML reader for the common case, exact or silent: the same objects PyYAML would
build, or None (then the caller uses PyYAML, which also words any error).

Why: PyYAML builds every node and resolves every scalar in Python, even with libyaml
underneath: ~1.3 s for a 10k-rule policy, most of a reload and of every fleet host's work per
put. rapidyaml (C++) parses the same text into a tree in ~50 ms and emits it as JSON that the
json module reads in ~25 ms. The two parsers differ in ways that matter, so the fast path
takes only documents on which they provably agree and refuses everything else:

* **Syntax**: libyaml itself must accept the document (``CParser.raw_parse``: libyaml's own
  scanner and parser in C, no Python objects, ~60 ms) -- rapidyaml is more lenient (it drops
  control characters PyYAML rejects, for one). The same pass counts libyaml's events, which
  must equal the nodes of the result (a structural misreading by either parser shows here).
* **Constructs** where the two differ are refused by a scan of the text: anchors and
  aliases (``&``, ``*``), tags (an unquoted ``!``), merge keys (``<<``), directives, document
  markers (``---``, ``...``), backslash escapes, tabs and carriage returns.
* **Scalar types**: YAML 1.1 (PyYAML) reads ``yes``, ``010``, ``0x1f``, ``1:30``, ``~``,
  ``2001-01-01`` as bool, int, null, timestamp; rapidyaml (YAML 1.2) leaves them strings. Any
  string in the result that PyYAML's own implicit resolvers (taken from PyYAML, not copied)
  would type is refused, and so is any float (no policy field is one, and the two disagree
  on ``1e3``). Keys too. Duplicate keys are refused (PyYAML's loader here rejects them).

What remains -- mappings, sequences, decimal integers, true/false/null and strings that no
resolver claims -- reads the same under both; tests/test_fastyaml.py compares the two on
generated documents.
"""

from __future__ import annotations

import json
from typing import Any, Final

import yaml
from yaml.resolver import Resolver

try:  # the fast path is optional: without rapidyaml every document takes PyYAML's path
    import ryml
except ImportError:  # pragma: no cover
    ryml = None

try:
    from yaml._yaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    CParser = None  # type: ignore[assignment, misc]

_STR_TAG: Final = "tag:yaml.org,2002:str"
# PyYAML's implicit resolvers by first character (its own table, minus the string tag)
_RESOLVERS: Final = {first: tuple(rx for tag, rx in resolvers if tag != _STR_TAG)
                     for first, resolvers in Resolver.yaml_implicit_resolvers.items()}
_ANY_FIRST: Final = _RESOLVERS.get(None, ())  # resolvers PyYAML tries for every scalar
_REFUSED_ANYWHERE: Final = ("&", "*", "\t", "\r", "<<", "\n%", "\n---", "\n...", "\\")
_TAG_BEFORE: Final = frozenset(" \n[{,:?-")  # a "!" after one of these starts a tag


class _Refused(Exception):
    pass


def _refused_text(text: str) -> bool:
    """Anchors/aliases, tags (a "!" not right after a quote), merge keys, directives,
    document markers, escapes (YAML 1.1's set is not YAML 1.2's), tabs, carriage returns:
    constructs the two parsers may read differently."""
    if any(s in text for s in _REFUSED_ANYWHERE) or text.startswith(("%", "---", "...")):
        return True
    at = text.find("!")
    while at != -1:
        if at == 0 or text[at - 1] in _TAG_BEFORE:
            return True
        at = text.find("!", at + 1)
    return False


def _typed(value: str) -> bool:
    """Would PyYAML resolve this plain scalar to something other than a string?"""
    for rx in _RESOLVERS.get(value[0] if value else "", ()):
        if rx.match(value):
            return True
    return any(rx.match(value) for rx in _ANY_FIRST)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Refused
    return out


def _refuse(_: str) -> Any:
    raise _Refused


class _Walk:
    """One pass over the result: libyaml's event count for it, and a refusal if any string
    (key or value) is one PyYAML would have typed. Iterative: documents are wide, not deep,
    and a call per scalar was most of the cost."""

    def __init__(self) -> None:
        self.verdicts: dict[str, bool] = {}

    def _check(self, value: str) -> None:
        verdict = self.verdicts.get(value)
        if verdict is None:
            verdict = self.verdicts[value] = _typed(value)
        if verdict:
            raise _Refused

    def events(self, root: Any) -> int:
        """Scalar 1, container 2 plus its contents (a mapping's keys are scalars too)."""
        verdicts = self.verdicts
        check = self._check
        stack = [root]
        n = 0
        while stack:
            node = stack.pop()
            kind = type(node)
            if kind is str:
                if verdicts.get(node) is not False:
                    check(node)
                n += 1
            elif kind is dict:
                n += 2 + len(node)
                for key in node:
                    if verdicts.get(key) is not False:
                        check(key)
                stack.extend(node.values())
            elif kind is list:
                n += 2
                stack.extend(node)
            else:
                n += 1
        return n


def load(text: str) -> Any | None:
    """What ``yaml.load(text, SafeLoader)`` returns, or None when not certain of that."""
    if ryml is None or CParser is None or not text or _refused_text(text):
        return None
    data = text.encode()
    try:
        events = CParser(data).raw_parse()
    except yaml.YAMLError:
        return None
    try:
        tree = ryml.parse_in_arena(data)
        if tree.is_stream(tree.root_id()):  # several documents: PyYAML refuses them
            return None
        js = ryml.emit_json_malloc(tree, tree.root_id())
    except Exception:  # rapidyaml's own parse errors: PyYAML words them
        return None
    try:
        doc = json.loads(js, object_pairs_hook=_no_duplicates, parse_float=_refuse,
                         parse_constant=_refuse)
        if events != 4 + _Walk().events(doc):  # stream, document, then the nodes
            return None
    except (_Refused, ValueError, RecursionError):
        return None
    return doc
