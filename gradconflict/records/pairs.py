"""The name of a pair of tasks: one key, unambiguous for any task names, used by every sink, the history's columns
and moving averages, the diagnosis, the run summary and the reports.

A pair's key is its two task names, sorted, joined by :data:`SEPARATOR` (``"depth/seg"``): the key of a pair never
depends on the order of the losses dict. Inside each name, the escape character :data:`ESCAPE` and the separator
are percent-escaped (``%`` as ``%25``, ``/`` as ``%2F``), so that a task called ``"a/b"`` paired with ``"c"`` can
never share a key with the pair of ``"a"`` and ``"b/c"``: the only separator left in a key is the one between the
two names, and :func:`split_pair_key` reads the names back. Ordinary names (no ``/``, no ``%``) are kept as they
are.

>>> pair_key("seg", "depth")
'depth/seg'
>>> pair_key("a/b", "c"), pair_key("a", "b/c")      # two different pairs, two different keys
('a%2Fb/c', 'a/b%2Fc')
>>> split_pair_key(pair_key("50%", "x/y"))
('50%', 'x/y')
"""

from __future__ import annotations

__all__ = ["ESCAPE", "SEPARATOR", "pair_key", "pair_words", "split_pair_key"]

#: What joins the two names of a pair's key.
SEPARATOR = "/"
#: What starts an escaped character inside a name.
ESCAPE = "%"

_ESCAPED = {ESCAPE: f"{ESCAPE}{ord(ESCAPE):02X}", SEPARATOR: f"{ESCAPE}{ord(SEPARATOR):02X}"}


def _escape(name: str) -> str:
    # The escape character first, so that the escapes of the separator are not escaped again.
    return name.replace(ESCAPE, _ESCAPED[ESCAPE]).replace(SEPARATOR, _ESCAPED[SEPARATOR])


def _unescape(part: str) -> str:
    # The separator first: after it, every "%25" left is an escaped escape character.
    return part.replace(_ESCAPED[SEPARATOR], SEPARATOR).replace(_ESCAPED[ESCAPE], ESCAPE)


def pair_key(a: str, b: str) -> str:
    """The key of the pair of tasks ``a`` and ``b``: the names sorted, each escaped, joined by ``/``.

    ``pair_key(a, b) == pair_key(b, a)``; two different pairs never share a key, whatever their names.

    >>> pair_key("b", "a")
    'a/b'
    """
    first, second = sorted((str(a), str(b)))
    return f"{_escape(first)}{SEPARATOR}{_escape(second)}"


def split_pair_key(key: str) -> tuple[str, str]:
    """The two task names of a key made by :func:`pair_key`, sorted; ``ValueError`` for anything else.

    >>> split_pair_key("a%2Fb/c")
    ('a/b', 'c')
    """
    parts = key.split(SEPARATOR)
    if len(parts) != 2:
        raise ValueError(f"{key!r} is not a pair key (two task names joined by {SEPARATOR!r}, made by pair_key)")
    first, second = (_unescape(p) for p in parts)
    return first, second


def pair_words(a: str, b: str) -> str:
    """The pair in a sentence, ``"a and b"`` (the names sorted, as they are, unescaped).

    >>> pair_words("seg", "depth")
    'depth and seg'
    """
    first, second = sorted((str(a), str(b)))
    return f"{first} and {second}"
