"""scipy's LAPACK, called without the GIL.

scipy.linalg.lapack's wrappers hold the GIL for the whole call, so two one-thread
eigensolvers in two Python threads run one after the other. The same routines, through
the function pointers that scipy.linalg.cython_lapack exports and ctypes (which releases
the GIL around a foreign call), run side by side: the solvers' independent per-task
decompositions then use every core while each stays on one thread (issue 25). Same
library, same arguments, same bits (tests/solvers/test_lapack.py compares them with
scipy.linalg.lapack's).

Every argument goes by address, as in Fortran: arrays as they are, scalars as one-element
arrays (`_int`, `_real`, `_char`).
"""

from __future__ import annotations

import ctypes
from typing import Dict, Tuple

import numpy as np

_FUNCTIONS: Dict[str, ctypes._CFuncPtr] = {}
_CAPSULE_NAME = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_CAPSULE_POINTER = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def _call(name: str, *args: np.ndarray) -> None:
    function = _FUNCTIONS.get(name)
    if function is None:
        from scipy.linalg import cython_lapack  # a dependency of mergekit; imported on first use

        capsule = cython_lapack.__pyx_capi__[name]
        pointer = _CAPSULE_POINTER(capsule, _CAPSULE_NAME(capsule))
        function = _FUNCTIONS[name] = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * len(args))(pointer)
    function(*(arg.ctypes.data for arg in args))


def _int(value: int = 0) -> np.ndarray:
    return np.array([value], dtype=np.intc)


def _real(value: float = 0.0) -> np.ndarray:
    return np.array([value], dtype=np.float64)


def _char(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype="S1")


def _column_major(matrix: np.ndarray) -> np.ndarray:
    if matrix.dtype != np.float64 or not matrix.flags.f_contiguous or matrix.ndim != 2:
        raise ValueError(f"expected a column-major float64 matrix, got {matrix.dtype} {matrix.shape}")
    return matrix


def dsytrd(matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Householder tridiagonal reduction, lower triangle, written over the column-major
    `matrix` (its reflectors below the subdiagonal): (diagonal, off-diagonal, tau, info),
    with the optimal workspace, as scipy.linalg.lapack.dsytrd with dsytrd_lwork's size."""
    size = _column_major(matrix).shape[0]
    diagonal, off, tau = np.empty(size), np.empty(max(size - 1, 0)), np.empty(max(size - 1, 0))
    order, info, query = _int(size), _int(), np.empty(1)
    _call("dsytrd", _char("L"), order, matrix, order, diagonal, off, tau, query, _int(-1), info)
    if info[0] == 0:
        work = np.empty(max(1, int(query[0])))
        _call("dsytrd", _char("L"), order, matrix, order, diagonal, off, tau, work, _int(work.size), info)
    return diagonal, off, tau, int(info[0])


def dstebz_top(diagonal: np.ndarray, off: np.ndarray, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The `count` largest eigenvalues of the tridiagonal matrix by bisection (range I,
    blocks order, tolerance 0): (values, blocks, splits, info), as scipy.linalg.lapack.dstebz."""
    size = diagonal.shape[0]
    found, pieces, info = _int(), _int(), _int()
    values, blocks, splits = np.zeros(size), np.zeros(size, dtype=np.intc), np.zeros(size, dtype=np.intc)
    _call(
        "dstebz", _char("I"), _char("B"), _int(size), _real(), _real(), _int(size - count + 1), _int(size), _real(),
        diagonal, off, found, pieces, values, blocks, splits, np.empty(4 * size), np.empty(3 * size, dtype=np.intc), info,
    )
    return values[: found[0]], blocks, splits, int(info[0])


def dstein(diagonal, off, values, blocks, splits) -> Tuple[np.ndarray, int]:
    """Eigenvectors (n, m) of the tridiagonal matrix for dstebz's m values, by inverse
    iteration: (vectors, info), as scipy.linalg.lapack.dstein."""
    size, count = diagonal.shape[0], values.shape[0]
    vectors, info = np.empty((size, count), order="F"), _int()
    _call(
        "dstein", _int(size), diagonal, off, _int(count), values, blocks, splits, vectors, _int(max(1, size)),
        np.empty(5 * size), np.empty(size, dtype=np.intc), np.empty(max(1, count), dtype=np.intc), info,
    )
    return vectors, int(info[0])


def dsyevr_top(matrix: np.ndarray, count: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """The `count` largest eigenpairs of the symmetric column-major `matrix`, which is
    overwritten: (values ascending, vectors (n, count) column-major, info), with
    scipy.linalg.lapack.dsyevr's defaults (upper triangle, workspaces 26 n and 10 n), so its bits."""
    size = _column_major(matrix).shape[0]
    found, info = _int(), _int()
    values, vectors = np.empty(size), np.empty((size, max(count, 1)), order="F")
    _call(
        "dsyevr", _char("V"), _char("I"), _char("U"), _int(size), matrix, _int(size), _real(), _real(1.0),
        _int(size - count + 1), _int(size), _real(), found, values, vectors, _int(size),
        np.empty(2 * max(1, size), dtype=np.intc), np.empty(max(1, 26 * size)), _int(max(1, 26 * size)),
        np.empty(max(1, 10 * size), dtype=np.intc), _int(max(1, 10 * size)), info,
    )
    return values[:count], vectors[:, :count], int(info[0])
