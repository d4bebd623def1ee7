"""The dense solver's LAPACK: one Householder tridiagonalisation, all eigenvalues, the top k vectors.

Two ways in, the first that loads:

1. ``lapacke``: numpy's own OpenBLAS (its wheels bundle an ILP64 build with the LAPACKE C interface),
   called through ctypes, which releases the GIL for each call. matplotlib's import (a thread started
   for the figure) then runs beside the tridiagonalisation on the other core instead of between its
   calls (f2py holds the GIL): N = 2,000, Δ² + solve + import, best of 5 fresh processes 0.88 s vs
   0.98 s with f2py and 1.46 s after ``import scipy.linalg`` (bench/bench_mds_phase.py).
2. ``scipy``: scipy's f2py wrappers, ``scipy.linalg._flapack``, loaded without ``import scipy.linalg``.
   That import costs 0.25-0.6 s after numpy and torch on a 2-core VM, mostly because scipy 1.17's
   array-API layer touches every attribute of numpy and so imports numpy.f2py; the extension module
   alone loads in ~5 ms. If scipy.linalg is already imported, or the file is not where scipy keeps it,
   the public ``scipy.linalg.lapack`` is used.

``tridiagonal_topk`` returns None when neither is available (the caller uses numpy's full eigh).
"""
from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import importlib.util
import os
import sys

import numpy as np

_FLAPACK = "scipy.linalg._flapack"
_F2PY_ROUTINES = ("dsytrd", "dsytrd_lwork", "dsterf", "dstebz", "dstein", "dormqr")
_COL_MAJOR = 102
_backend: tuple | None = None


def backend_name() -> str | None:
    """"lapacke", "scipy" or None: which way in tridiagonal_topk takes in this process."""
    b = _load()
    return b[0] if b else None


def tridiagonal_topk(B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """All eigenvalues of the symmetric B (descending) and the eigenvectors of the top k [n, k].

    dsytrd (lower), dsterf on the tridiagonal, its top k by bisection (dstebz, by index, block order,
    abstol 0) and inverse iteration (dstein), sorted, then back to B's basis (dormtr / dormqr): what
    scipy.linalg.eigh_tridiagonal(select="i") and LAPACK's dormtr do, at about a third of a full eigh.
    """
    b = _load()
    if b is None:
        return None
    return (_topk_lapacke if b[0] == "lapacke" else _topk_f2py)(b[1], B, k)


def _check(routine: str, info: int) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info={info})")


def _load():
    global _backend
    if _backend is None:
        lib = _lapacke()
        if lib is not None:
            _backend = ("lapacke", lib)
        else:
            mod = _flapack()
            _backend = ("scipy", mod) if mod is not None else ()
    return _backend or None


# -- 1. numpy's OpenBLAS through ctypes ------------------------------------------------------------

class _Lapacke:
    """The five LAPACKE routines of one ILP64 library (64-bit integers, the "64_" symbol suffix)."""

    def __init__(self, lib: ctypes.CDLL, prefix: str):
        i, d, p, c = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_char
        ip = ctypes.POINTER(ctypes.c_int64)

        def fn(name, *argtypes):
            f = getattr(lib, f"{prefix}LAPACKE_{name}64_")
            f.restype, f.argtypes = i, list(argtypes)
            return f
        self.sytrd = fn("dsytrd", ctypes.c_int, c, i, p, i, p, p, p)
        self.sterf = fn("dsterf", i, p, p)
        self.stebz = fn("dstebz", c, c, i, d, d, i, i, d, p, p, ip, ip, p, p, p)
        self.stein = fn("dstein", ctypes.c_int, i, p, p, i, p, p, p, p, i, p)
        self.ormtr = fn("dormtr", ctypes.c_int, c, c, c, i, i, p, i, p, p, i)


def _lapacke() -> _Lapacke | None:
    """numpy's bundled OpenBLAS (numpy.libs/, as auditwheel lays out numpy's Linux wheels), or None."""
    if os.environ.get("PYLANDSCAPE_LAPACK", "") == "scipy":
        return None
    libs = sorted(glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas64*")))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):  # numpy >= 2 (scipy-openblas64); numpy 1.x's openblas64_ (not tried here)
            try:
                return _Lapacke(lib, prefix)
            except AttributeError:
                continue
    return None


def _topk_lapacke(L: _Lapacke, B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = B.shape[0]
    A = np.array(B, dtype=np.float64, order="F", copy=True)  # overwritten by the reflectors
    d, e, tau = np.empty(n), np.zeros(n), np.zeros(n)
    _check("dsytrd", L.sytrd(_COL_MAJOR, b"L", n, A.ctypes.data, n, d.ctypes.data, e.ctypes.data,
                             tau.ctypes.data))
    vals, scratch = d.copy(), e.copy()
    _check("dsterf", L.sterf(n, vals.ctypes.data, scratch.ctypes.data))
    m, nsplit = ctypes.c_int64(), ctypes.c_int64()
    w = np.zeros(n)  # all n entries: LAPACKE checks n of them for NaN, whatever m is
    iblock, isplit = np.zeros(n, np.int64), np.zeros(n, np.int64)
    _check("dstebz", L.stebz(b"I", b"B", n, 0.0, 1.0, n - k + 1, n, 0.0, d.ctypes.data, e.ctypes.data,
                             ctypes.byref(m), ctypes.byref(nsplit), w.ctypes.data, iblock.ctypes.data,
                             isplit.ctypes.data))
    m = m.value
    Z = np.zeros((n, m), order="F")
    ifail = np.zeros(max(m, 1), np.int64)
    _check("dstein", L.stein(_COL_MAJOR, n, d.ctypes.data, e.ctypes.data, m, w.ctypes.data, iblock.ctypes.data,
                             isplit.ctypes.data, Z.ctypes.data, n, ifail.ctypes.data))
    Z = np.asfortranarray(Z[:, np.argsort(w[:m])[::-1]])
    _check("dormtr", L.ormtr(_COL_MAJOR, b"L", b"L", b"N", n, m, A.ctypes.data, n, tau.ctypes.data,
                             Z.ctypes.data, n))
    return vals[::-1].copy(), np.ascontiguousarray(Z)


# -- 2. scipy's f2py wrappers -------------------------------------------------------------------------

def _flapack():
    """scipy.linalg._flapack (already imported, or loaded on its own), else scipy.linalg.lapack, else None."""
    mod = sys.modules.get(_FLAPACK) or _load_extension()
    if mod is None or not all(hasattr(mod, r) for r in _F2PY_ROUTINES):
        try:
            from scipy.linalg import lapack as mod
        except ImportError:  # pragma: no cover - depends on the environment
            return None
    return mod


def _load_extension():
    """The extension file loaded on its own; the package scipy.linalg is not imported."""
    try:
        import scipy  # ~10 ms: the top-level package only (its platform set-up, its path)
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    for folder in getattr(scipy, "__path__", ()):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "linalg", "_flapack" + suffix)
            if not os.path.isfile(path):
                continue
            try:
                loader = importlib.machinery.ExtensionFileLoader(_FLAPACK, path)
                mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
                    _FLAPACK, path, loader=loader))
                loader.exec_module(mod)
            except Exception:  # noqa: BLE001 - any failure: the public import decides
                return None
            return mod
    return None


def _topk_f2py(lapack, B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = B.shape[0]
    lwork, _ = lapack.dsytrd_lwork(n, lower=1)
    c, d, e, tau, info = lapack.dsytrd(B, lower=1, lwork=int(lwork))
    _check("dsytrd", info)
    vals, info = lapack.dsterf(d, e)
    _check("dsterf", info)
    m, w, iblock, isplit, info = lapack.dstebz(d, e, 2, 0.0, 1.0, n - k + 1, n, 0.0, "B")
    _check("dstebz", info)
    w = w[:m]
    z, info = lapack.dstein(d, e, w, iblock, isplit)
    _check("dstein", info)
    z = np.asfortranarray(z[:, np.argsort(w)[::-1]])
    # Q = H_0 ... H_{n-2}, H_i = I - tau_i v v^T with v = (1, c[i+2:, i]) from row i+1: dormtr("L") is
    # dormqr on rows 1.. (scipy exposes dormqr, not dormtr).
    a = np.asfortranarray(c[1:, :n - 1])
    zq, _, info = lapack.dormqr("L", "N", a, tau[:n - 1], z[1:], lwork=max(1, 64 * k))
    _check("dormqr", info)
    z[1:] = zq
    return vals[::-1].copy(), np.ascontiguousarray(z)
