"""Module-name patterns whose matching cost is bounded.

PEFT's ``target_modules`` / ``exclude_modules`` strings and the keys of
``rank_pattern`` / ``alpha_pattern`` are regular expressions, read from adapter
configs that anyone can publish. Python's ``re`` is a backtracking matcher: a
pattern such as ``(a+)+$`` or ``(a|aa)*b`` takes time exponential in the length
of the name it fails on (minutes for a 40-character name), and ``.*.*.*.*.*x``
takes time of a high power of it. :func:`compile_module_pattern` refuses such
patterns before anything is matched and compiles the rest;
:func:`fullmatch_module_name` and :func:`match_pattern_key` match names of
bounded length with them.

How a pattern is judged (a static analysis of ``re``'s own parse tree, which
may refuse a harmless pattern but never accepts one of the shapes below):

* **Backreferences** (``(a)\\1``, ``(?P=x)``, ``(?(1)a|b)``) are refused.
* **A repeat of two or more iterations whose body is ambiguous** is refused:
  a body that can match the empty string (``(a?)*``); an alternation inside
  it whose branches can start alike (``(a|aa)*``, ``(a|ab)*b``); a repeat
  inside it that could stop at several places, because what follows it (the
  rest of the body, the next iteration, or what comes after the loop) can
  start with a character it can also consume (``(a+)+``, ``(.*a)*``,
  ``(\\w+\\w)+``). Delimited repeats such as ``(\\.\\w+)*`` are fine: the next
  iteration must start with ``.``, which ``\\w`` cannot consume.
* **The degree**: an unbounded repeat (``.*``, ``\\d+``) that can stop at many
  places, because what follows it can start with a character it can consume
  (``.*`` before ``\\.``), multiplies the work by up to the name's length. At
  most :data:`MAX_DEGREE` of them may lie on one path through the pattern
  (``.*decoder.*(SelfAttention|EncDecAttention).*(q|v)$`` has 3).
* **The finite ambiguity** (alternatives that can both match, optional parts
  that can be skipped or not, repeated a fixed number of times) is at most
  :data:`MAX_AMBIGUITY` ways.

For an accepted pattern of degree ``d`` and ambiguity ``k``, matching a name of
``n`` characters takes on the order of ``k * n ** (d + 1)`` steps at worst;
names are limited to :data:`MAX_NAME_LENGTH` characters.
"""

from __future__ import annotations

import functools
import re

try:  # Python >= 3.11
    from re import _parser as sre_parse  # noqa: N813 - the stdlib's own name for it
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse  # type: ignore[no-redef]

MAX_DEGREE = 3
MAX_AMBIGUITY = 64
MAX_NAME_LENGTH = 1024

_LITERAL, _NOT_LITERAL, _ANY, _IN = sre_parse.LITERAL, sre_parse.NOT_LITERAL, sre_parse.ANY, sre_parse.IN
_AT, _BRANCH, _SUBPATTERN = sre_parse.AT, sre_parse.BRANCH, sre_parse.SUBPATTERN
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT} | (
    {sre_parse.POSSESSIVE_REPEAT} if hasattr(sre_parse, "POSSESSIVE_REPEAT") else set()
)
_ATOMIC = getattr(sre_parse, "ATOMIC_GROUP", None)
_ASSERTS = {sre_parse.ASSERT, sre_parse.ASSERT_NOT}
_BACKREFS = {sre_parse.GROUPREF, sre_parse.GROUPREF_EXISTS}
_MAXREPEAT = sre_parse.MAXREPEAT
_IGNORECASE, _ASCII = sre_parse.SRE_FLAG_IGNORECASE, sre_parse.SRE_FLAG_ASCII
_HINT = (
    "write it without a repeat inside a repeat and with fewer `.*` (one `.*` before a fixed suffix is fine), "
    "or list the module names (a list of name suffixes, or `^(a\\.b|c\\.d)$`)"
)


class UnsafePatternError(ValueError):
    """A module-name pattern refused because matching it could take unbounded time."""


def compile_module_pattern(
    pattern: str, *, what: str, error: type[Exception] = UnsafePatternError
) -> re.Pattern:
    """Compile ``pattern`` after checking that matching it is cheap (see the module docstring).

    The check assumes the pattern is used with ``fullmatch`` (as PEFT uses
    ``target_modules`` / ``exclude_modules``): use :func:`fullmatch_module_name`,
    or :func:`match_pattern_key` for ``rank_pattern`` / ``alpha_pattern`` keys.

    Args:
      pattern: the regular expression.
      what: what it is, for messages (``"target_modules"``, ``"rank_pattern key"``).
      error: the exception type raised for a refused or invalid pattern, called
        with one message; :class:`UnsafePatternError` (a ValueError) by default.
    Returns: the compiled pattern.
    Raises:
      TypeError if ``pattern`` is not a str; ``error`` naming ``what``, the
      pattern and the reason if it is not a valid regular expression or its
      matching cost could blow up.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a regular expression string, got {type(pattern).__name__}: {pattern!r}")
    problem = pattern_problem(pattern)
    if problem is not None:
        raise error(f"{what} {pattern!r} is refused: {problem}")
    return re.compile(pattern)


@functools.lru_cache(maxsize=512)
def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is refused by :func:`compile_module_pattern` (None when it is not)."""
    try:
        parsed = sre_parse.parse(pattern, 0)
        re.compile(pattern)
    except (re.error, OverflowError) as exc:
        return f"it is not a valid regular expression ({exc})"
    except RecursionError:
        return "it is nested too deeply to analyse"
    try:
        degree, ambiguity = _Analysis().sequence(list(parsed), _EMPTY, bool(parsed.state.flags & _IGNORECASE))
    except _Refused as refusal:
        return f"{refusal}; matching it could backtrack for minutes per module name. {_HINT[0].upper()}{_HINT[1:]}"
    except RecursionError:
        return "it is nested too deeply to analyse"
    if degree > MAX_DEGREE:
        return (
            f"{degree} unbounded repeats (like `.*`) can each stop at many places in one name, so matching costs "
            f"up to (name length)^{degree + 1} steps; at most {MAX_DEGREE} are allowed. {_HINT[0].upper()}{_HINT[1:]}"
        )
    if ambiguity > MAX_AMBIGUITY:
        return (
            f"its alternatives and optional parts can match one name in more than {MAX_AMBIGUITY} ways, and each is "
            f"tried in turn. {_HINT[0].upper()}{_HINT[1:]}"
        )
    return None


def fullmatch_module_name(compiled: re.Pattern, name: str, *, max_length: int = MAX_NAME_LENGTH) -> bool:
    """True when ``compiled`` (from :func:`compile_module_pattern`) matches the whole of ``name``.

    Raises ValueError for a name longer than ``max_length`` characters (the
    bound on matching cost assumes short names; real module names are far
    shorter), TypeError for arguments of the wrong type.
    """
    _check_match_args(compiled, name, max_length, "fullmatch_module_name")
    return compiled.fullmatch(name) is not None


def match_pattern_key(compiled_key: re.Pattern, name: str, *, max_length: int = MAX_NAME_LENGTH) -> bool:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` key match, ``re.match(rf"(.*\\.)?({key})$", name)``,
    without the extra ``(.*\\.)?`` repeat: True when the key (compiled by
    :func:`compile_module_pattern`) fully matches ``name`` from its start or
    from just after one of its dots.

    ``^``, ``\\b`` and lookbehinds see the whole name, as in PEFT's form
    (``Pattern.fullmatch(name, pos)``, not a slice). Raises as
    :func:`fullmatch_module_name`.
    """
    _check_match_args(compiled_key, name, max_length, "match_pattern_key")
    starts = [0] + [i + 1 for i, ch in enumerate(name) if ch == "."]
    return any(compiled_key.fullmatch(name, start) is not None for start in starts)


def _check_match_args(compiled: object, name: object, max_length: int, caller: str) -> None:
    if not isinstance(compiled, re.Pattern):
        raise TypeError(
            f"{caller}: expected a compiled pattern (from compile_module_pattern), got {type(compiled).__name__}"
        )
    if not isinstance(name, str):
        raise TypeError(f"{caller}: name must be a str, got {type(name).__name__}")
    if len(name) > max_length:
        raise ValueError(
            f"{caller}: module name {name[:60]!r}... is {len(name)} characters; expected at most "
            f"max_length={max_length} (patterns are matched only against names of bounded length)"
        )


# --------------------------------------------------------------------------- analysis


class _Refused(Exception):
    """Raised inside the analysis with the reason a pattern is refused."""


class _Chars:
    """A set of characters, over-approximated: finite, or given by a membership
    test (``tag`` names a category so two categories can be proven disjoint)."""

    __slots__ = ("finite", "test", "tag")

    def __init__(self, finite: frozenset | None = None, test=None, tag: tuple | None = None) -> None:
        self.finite, self.test, self.tag = finite, test, tag

    def contains(self, ch: str) -> bool:
        return ch in self.finite if self.finite is not None else self.test(ch)

    def is_empty(self) -> bool:
        return self.finite is not None and not self.finite

    def overlaps(self, other: _Chars) -> bool:
        if self.finite is not None and other.finite is not None:
            return not self.finite.isdisjoint(other.finite)
        if self.finite is not None:
            return any(other.test(ch) for ch in self.finite)
        if other.finite is not None:
            return any(self.test(ch) for ch in other.finite)
        return not _disjoint_categories(self.tag, other.tag)

    def union(self, other: _Chars) -> _Chars:
        if self.is_empty():
            return other
        if other.is_empty():
            return self
        if self.finite is not None and other.finite is not None:
            return _Chars(self.finite | other.finite)
        if self.tag == ("any",) or other.tag == ("any",):
            return _ANYCHAR
        return _Chars(test=lambda ch, a=self, b=other: a.contains(ch) or b.contains(ch))


_EMPTY = _Chars(frozenset())
_ANYCHAR = _Chars(test=lambda ch: True, tag=("any",))

# Membership tests are supersets of what ``re`` matches under any flags (ASCII or
# Unicode), so "no overlap" is never claimed wrongly.
_CATEGORIES = {
    sre_parse.CATEGORY_DIGIT: (lambda ch: ch.isdecimal(), "digit"),
    sre_parse.CATEGORY_NOT_DIGIT: (lambda ch: not ("0" <= ch <= "9"), "not-digit"),
    sre_parse.CATEGORY_SPACE: (lambda ch: ch.isspace(), "space"),
    sre_parse.CATEGORY_NOT_SPACE: (lambda ch: ch not in " \t\n\r\f\v", "not-space"),
    sre_parse.CATEGORY_WORD: (lambda ch: ch.isalnum() or ch == "_", "word"),
    sre_parse.CATEGORY_NOT_WORD: (lambda ch: not (ch.isascii() and (ch.isalnum() or ch == "_")), "not-word"),
}
# Pairs of categories no character belongs to both of, under any flags. (A category
# and its complement are not listed: `(?a:\d)` and `\D` share the non-ASCII digits.)
_DISJOINT = {frozenset({"digit", "space"}), frozenset({"word", "space"})}


def _disjoint_categories(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None or a[0] != "category" or b[0] != "category":
        return False
    return frozenset({a[1], b[1]}) in _DISJOINT


@functools.lru_cache(maxsize=1024)
def _literal_chars(code: int, icase: bool) -> _Chars:
    ch = chr(code)
    return _ANYCHAR if icase and _cased(ch) else _Chars(frozenset(ch))


def _cased(ch: str) -> bool:
    return ch.lower() != ch or ch.upper() != ch or ch.casefold() != ch


class _Analysis:
    """The static cost analysis over ``re``'s parse tree (see the module docstring).

    ``sequence(items, follow, icase)`` returns ``(degree, ambiguity)`` for a
    sequence of parse items followed by characters in ``follow`` (the empty
    set at the end of the name, as for ``fullmatch``), or raises _Refused.
    """

    def __init__(self) -> None:
        self._first: dict = {}

    # -- first characters and nullability ----------------------------------

    def leaf_chars(self, op, av, icase: bool) -> _Chars:
        if op == _ANY:
            return _ANYCHAR
        if op == _LITERAL:
            return _literal_chars(av, icase)
        if op == _NOT_LITERAL:
            ch = chr(av)
            return _Chars(test=lambda x, ch=ch: x != ch)  # with IGNORECASE a subset of this
        # IN: a character class
        items = list(av)
        negate = bool(items) and items[0][0] == sre_parse.NEGATE
        if negate:
            items = items[1:]
        finite: set = set()
        tests = []
        tag = None
        for kind, value in items:
            if kind == _LITERAL:
                ch = chr(value)
                if icase and _cased(ch) and not negate:
                    return _ANYCHAR
                finite.add(ch)
            elif kind == sre_parse.RANGE:
                lo, hi = value
                if hi - lo < 256 and not (icase and not negate and any(_cased(chr(c)) for c in range(lo, hi + 1))):
                    finite.update(chr(c) for c in range(lo, hi + 1))
                elif icase and not negate:
                    return _ANYCHAR
                else:
                    tests.append(lambda x, lo=lo, hi=hi: lo <= ord(x) <= hi)
            elif kind == sre_parse.CATEGORY and value in _CATEGORIES:
                test, name = _CATEGORIES[value]
                tests.append(test)
                tag = ("category", name) if len(items) == 1 else None
            else:  # anything unforeseen: assume it can be any character
                return _ANYCHAR
        if negate:
            # NOTE: a negated class is over-approximated by "anything but its literals".
            return _Chars(test=lambda x, f=frozenset(finite): x not in f) if not tests else _ANYCHAR
        if not tests:
            return _Chars(frozenset(finite))
        fin = frozenset(finite)
        test = lambda x, f=fin, ts=tuple(tests): x in f or any(t(x) for t in ts)  # noqa: E731
        return _Chars(test=test, tag=tag if not fin else None)

    def first(self, item, icase: bool) -> tuple[bool, _Chars]:
        """(nullable, first characters) of one parse item."""
        key = (id(item), icase)
        cached = self._first.get(key)
        if cached is not None:
            return cached[0]
        op, av = item
        if op in (_LITERAL, _NOT_LITERAL, _ANY, _IN):
            result = (False, self.leaf_chars(op, av, icase))
        elif op == _AT or op in _ASSERTS or op in _BACKREFS:
            result = (True, _EMPTY)
        elif op == _SUBPATTERN:
            result = self.seq_first(av[3], self._icase(icase, av[1], av[2]))
        elif _ATOMIC is not None and op == _ATOMIC:
            result = self.seq_first(av, icase)
        elif op == _BRANCH:
            nullable, chars = False, _EMPTY
            for branch in av[1]:
                n, c = self.seq_first(branch, icase)
                nullable, chars = nullable or n, chars.union(c)
            result = (nullable, chars)
        elif op in _REPEATS:
            lo, hi, body = av
            n, c = self.seq_first(body, icase)
            result = (lo == 0 or n, c if hi > 0 else _EMPTY)
        else:
            raise _Refused(f"it uses a construct the cost analysis does not know ({op})")
        self._first[key] = (result, item)  # NOTE: keeps the item alive so its id is not reused
        return result

    def seq_first(self, items, icase: bool) -> tuple[bool, _Chars]:
        chars = _EMPTY
        for item in items:
            nullable, c = self.first(item, icase)
            chars = chars.union(c)
            if not nullable:
                return False, chars
        return True, chars

    @staticmethod
    def _icase(icase: bool, add: int, remove: int) -> bool:
        return bool((icase or add & _IGNORECASE) and not remove & _IGNORECASE)

    # -- degree and ambiguity -----------------------------------------------

    def sequence(self, items, follow: _Chars, icase: bool) -> tuple[int, int]:
        items = list(items)
        if all(op == _LITERAL for op, _ in items):  # fixed text (module names): nothing to choose
            return 0, 1
        follows = [follow] * len(items)
        after = follow
        for i in range(len(items) - 1, -1, -1):
            follows[i] = after
            nullable, chars = self.first(items[i], icase)
            after = chars.union(after) if nullable else chars
        degree, ambiguity = 0, 1
        for item, item_follow in zip(items, follows):
            d, k = self.item(item, item_follow, icase)
            degree, ambiguity = degree + d, _capped(ambiguity * k)
        return degree, ambiguity

    def item(self, item, follow: _Chars, icase: bool) -> tuple[int, int]:
        op, av = item
        if op in (_LITERAL, _NOT_LITERAL, _ANY, _IN, _AT):
            return 0, 1
        if op in _BACKREFS:
            raise _Refused("it uses a backreference or a conditional group, whose matching cost has no useful bound")
        if op == _SUBPATTERN:
            return self.sequence(av[3], follow, self._icase(icase, av[1], av[2]))
        if _ATOMIC is not None and op == _ATOMIC:
            return self.sequence(av, follow, icase)
        if op == _BRANCH:
            return self.branch(av[1], follow, icase)
        if op in _REPEATS:
            return self.repeat(*av, follow=follow, icase=icase)
        if op in _ASSERTS:
            # A lookaround succeeds at its first match (nothing after it inside
            # can make it retry), but it is re-run at every position tried.
            d, k = self.sequence(av[1], _EMPTY, icase)
            return d + (1 if _unbounded(av[1]) else 0), k
        raise _Refused(f"it uses a construct the cost analysis does not know ({op})")

    def repeat(self, lo: int, hi: int, body, *, follow: _Chars, icase: bool) -> tuple[int, int]:
        if hi == 0:
            return 0, 1
        body_nullable, body_first = self.seq_first(body, icase)
        if hi == 1:  # optional: taken or skipped
            d, k = self.sequence(body, follow, icase)
            if lo == 0 and (body_nullable or body_first.overlaps(follow)):
                k = _capped(2 * k)
            return d, k
        # A loop: each iteration is followed by the next one or by what follows the loop.
        d, k = self.sequence(body, body_first.union(follow), icase)
        if body_nullable:
            raise _Refused("it repeats a part that can match the empty string (like `(a?)*` or `(a*)+`)")
        if hi != lo:
            if d > 0:
                raise _Refused(
                    "it repeats a part containing a repeat that can stop at several places (like `(a+)+`, "
                    "`(.*a)*` or `(\\w+\\w)+`), so one name splits into iterations in exponentially many ways"
                )
            if k > 1:
                raise _Refused(
                    "it repeats a part that can match the same text in more than one way (like `(a|aa)*` or "
                    "`(a|ab)*b`), so one name splits into iterations in exponentially many ways"
                )
            if not body_first.overlaps(follow):
                return 0, 1  # where the loop stops is decided by the next character
            if hi == _MAXREPEAT:
                return 1, 1
            return 0, _capped(hi - lo + 1)
        return d * lo, _capped_power(k, lo)  # exactly lo iterations: their ambiguity multiplies

    def branch(self, branches, follow: _Chars, icase: bool) -> tuple[int, int]:
        results = [self.sequence(b, follow, icase) for b in branches]
        degree = max(d for d, _ in results)
        neighbours = self._ambiguous_pairs(branches, follow, icase)
        ambiguity = 1
        for i, (_, k) in enumerate(results):
            ambiguity = max(ambiguity, _capped(k + sum(results[j][1] for j in neighbours.get(i, ()))))
        return degree, ambiguity

    def _ambiguous_pairs(self, branches, follow: _Chars, icase: bool) -> dict[int, set[int]]:
        """Pairs of branches that may both match at one position (then both are tried, and
        what follows is matched once per branch): i -> {j, ...}."""
        pairs: dict[int, set[int]] = {}

        def link(i: int, j: int) -> None:
            pairs.setdefault(i, set()).add(j)
            pairs.setdefault(j, set()).add(i)

        literal, other = [], []
        for i, branch in enumerate(branches):
            items = list(branch)
            if items and not icase and all(op == _LITERAL for op, _ in items):
                literal.append((i, "".join(chr(av) for _, av in items)))
            else:
                other.append(i)
        # Literal branches (fastlora's own escaped module names): both can match only when
        # one is a prefix of the other and what follows the alternation can continue the longer.
        literal.sort(key=lambda entry: entry[1])
        for a, (i, s) in enumerate(literal):
            for j, t in literal[a + 1:]:
                if not t.startswith(s):
                    break
                if t == s or follow.contains(t[len(s)]):
                    link(i, j)
        # The others: by the first characters they (or what follows, if they can be empty) start with.
        starts = {}
        for i in other:
            nullable, chars = self.seq_first(branches[i], icase)
            starts[i] = (nullable, chars.union(follow) if nullable else chars)
        if len(other) * len(branches) > 200_000:  # pragma: no cover - thousands of non-literal branches
            raise _Refused("it has too many non-literal alternatives to analyse")
        for i in other:
            for j, s in literal:
                if starts[i][1].contains(s[0]):
                    link(i, j)
        for a, i in enumerate(other):
            for j in other[a + 1:]:
                (ni, ci), (nj, cj) = starts[i], starts[j]
                if (ni and nj) or ci.overlaps(cj):
                    link(i, j)
        return pairs


def _unbounded(items) -> bool:
    """True when the sequence contains a repeat without an upper bound."""
    for op, av in items:
        if op in _REPEATS and (av[1] == _MAXREPEAT or _unbounded(av[2])):
            return True
        if op == _SUBPATTERN and _unbounded(av[3]):
            return True
        if (_ATOMIC is not None and op == _ATOMIC) and _unbounded(av):
            return True
        if op == _BRANCH and any(_unbounded(b) for b in av[1]):
            return True
        if op in _ASSERTS and _unbounded(av[1]):
            return True
    return False


def _capped(k: int) -> int:
    return min(k, MAX_AMBIGUITY + 1)


def _capped_power(k: int, n: int) -> int:
    result = 1
    for _ in range(n):
        result = _capped(result * k)
        if k == 1 or result > MAX_AMBIGUITY:
            break
    return result
