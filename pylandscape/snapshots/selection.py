"""Which tensors and which snapshots: `--layer` (tensor names, globs, the paper's layer numbers) and
`--select` (a tiny expression language over metadata; nothing is eval'ed).

Words: a *tensor* is one named parameter tensor in the file; a *layer* is the paper's layer, a module's
weight together with its bias.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Sequence

from ..flat import ParamSpec
from .formats import WRAPPER_PREFIXES, SnapshotError


def parse_number(v: str):
    """int, else float, else the string itself."""
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def columns(meta: Sequence[dict]) -> list[str]:
    """Metadata column names in order of first appearance."""
    cols: dict[str, None] = {}
    for m in meta:
        for k in m:
            cols.setdefault(k, None)
    return list(cols)


def paper_layers(spec: ParamSpec) -> list[tuple[str, list[int]]]:
    """The paper's numbering: layer 1 is the input; layer k >= 2 is the (k-1)-th module owning a
    weight tensor with >= 2 dims (conv/linear), together with its bias. [(module, tensor indices)]."""
    out = []
    for i, (n, s) in enumerate(zip(spec.names, spec.shapes)):
        if n.endswith("weight") and len(s) >= 2:
            mod = n[: -len("weight")].rstrip(".")
            idx = [i]
            bias = f"{mod}.bias" if mod else "bias"
            if bias in spec.names:
                idx.append(spec.names.index(bias))
            out.append((mod or n, idx))
    return out


def select_tensors(spec: ParamSpec, layer: str | None) -> list[int]:
    """Tensor indices for `--layer` (None/'all': everything): tensor names or globs as stored in the file,
    with or without its wrapper prefix, or the paper's layer numbers; comma-separated for several."""
    if layer is None or str(layer).strip().lower() in ("", "all"):
        return list(range(len(spec)))
    chosen: list[int] = []
    for part in str(layer).split(","):
        part = part.strip()
        m = re.fullmatch(r"(?:layer)?\s*(\d+)", part, re.I)
        if m:
            k = int(m.group(1))
            layers = paper_layers(spec)
            if k < 2 or k > len(layers) + 1:
                listing = "; ".join(f"{j + 2}={mod}" for j, (mod, _) in enumerate(layers))
                what = "layer 1 is the input and has no weights" if k == 1 else f"there is no layer {k}"
                raise SnapshotError(f"--layer {part}: {what}; layers with weights are {listing}")
            idx = layers[k - 2][1]
        else:
            idx = _match_names(spec.names, part)
            if not idx:
                raise SnapshotError(f"--layer {part!r} matches no tensor; tensors are: "
                                    f"{', '.join(spec.names)}")
        chosen += [i for i in idx if i not in chosen]
    return sorted(chosen)


def _unwrapped(name: str) -> str:
    """name without the wrapper prefixes (model., module., _orig_mod., net.) it starts with."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name, changed = name[len(p):], True
    return name


def _match_names(names: Sequence[str], pattern: str) -> list[int]:
    """Tensors whose name matches the glob (or is below the module it names); wrapper prefixes are
    ignored on both sides, so 'module.conv1.*', '_orig_mod.conv1.*' and 'conv1.*' are the same."""
    def hits(name: str, pat: str) -> bool:
        return fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".")
    idx = [i for i, n in enumerate(names) if hits(n, pattern)]
    if not idx:
        bare = _unwrapped(pattern)
        idx = [i for i, n in enumerate(names) if hits(_unwrapped(n), bare)]
    return idx


# --select: tokens are numbers, quoted strings, operators and words.

_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?![\w.])|(?P<str>'[^']*'|"[^"]*")|
                        (?P<op>==|!=|<=|>=|<|>|=|\(|\)|\[|\]|,)|(?P<word>[A-Za-z_][\w.\-/]*))""", re.X)


def _tokenize(expr: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise SnapshotError(f"--select {expr!r}: cannot parse at {expr[pos:]!r}")
        pos = m.end()
        if m.group("num") is not None:
            out.append(("val", parse_number(m.group("num"))))
        elif m.group("str") is not None:
            out.append(("val", m.group("str")[1:-1]))
        elif m.group("op") is not None:
            out.append(("op", "==" if m.group("op") == "=" else m.group("op")))
        else:
            w = m.group("word")
            out.append(("kw", w.lower()) if w.lower() in ("and", "or", "not", "in") else ("word", w))
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


def _compare(a, op: str, b) -> bool:
    if a is None:
        return op == "!="
    if isinstance(b, (int, float)) and not isinstance(a, (int, float)):
        try:
            a = float(a)
        except (TypeError, ValueError):
            return op == "!="
    if isinstance(a, (int, float)) and isinstance(b, str):
        try:
            b = float(b)
        except ValueError:
            a = str(a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        pass
    else:
        a, b = str(a), str(b)
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def parse_select(expr: str, columns: Sequence[str] | None = None) -> Callable[[dict], bool]:
    """Predicate over a metadata dict: comparisons (==, !=, <, <=, >, >=), `col in (a, b)`,
    and/or/not, parentheses. Values are numbers, quoted strings or bare words. Nothing is eval'ed."""
    toks = _tokenize(expr)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else (None, None)

    def take(kind=None, val=None):
        nonlocal pos
        t = peek()
        if t[0] is None or (kind and t[0] != kind) or (val is not None and t[1] != val):
            want = val or kind
            raise SnapshotError(f"--select {expr!r}: expected {want} at token {pos + 1}"
                                f"{'' if t[0] is None else f' ({t[1]!r})'}")
        pos += 1
        return t

    def value():
        t = peek()
        if t[0] in ("val", "word"):
            take()
            return t[1]
        raise SnapshotError(f"--select {expr!r}: expected a value at token {pos + 1}")

    def comparison():
        if peek() == ("op", "("):
            take()
            f = disjunction()
            take("op", ")")
            return f
        if peek() == ("kw", "not"):
            take()
            g = comparison()
            return lambda m: not g(m)
        col = take("word")[1]
        if columns is not None and col not in columns:
            raise SnapshotError(f"--select: no metadata column {col!r}; columns are {', '.join(columns)}")
        t = peek()
        if t == ("kw", "in"):
            take()
            close = {"(": ")", "[": "]"}
            opener = peek()[1] if peek()[0] == "op" else None
            if opener in close:
                take()
            else:
                raise SnapshotError(f"--select {expr!r}: 'in' needs a list like (a, b)")
            vals = [value()]
            while peek() == ("op", ","):
                take()
                vals.append(value())
            take("op", close[opener])
            return lambda m, c=col, vs=tuple(vals): any(_compare(m.get(c), "==", v) for v in vs)
        op = take("op")[1]
        if op not in ("==", "!=", "<", "<=", ">", ">="):
            raise SnapshotError(f"--select {expr!r}: {op!r} is not a comparison")
        v = value()
        return lambda m, c=col, o=op, v=v: _compare(m.get(c), o, v)

    def conjunction():
        f = comparison()
        while peek() == ("kw", "and"):
            take()
            g = comparison()
            f = (lambda a, b: lambda m: a(m) and b(m))(f, g)
        return f

    def disjunction():
        f = conjunction()
        while peek() == ("kw", "or"):
            take()
            g = conjunction()
            f = (lambda a, b: lambda m: a(m) or b(m))(f, g)
        return f

    if not toks:
        raise SnapshotError("--select is empty")
    pred = disjunction()
    if pos != len(toks):
        raise SnapshotError(f"--select {expr!r}: unexpected {toks[pos][1]!r}")
    return pred
