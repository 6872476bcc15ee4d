"""Group-sequential boundaries: Lan-DeMets alpha spending and exact |t| boundaries for repeated paired looks.

The derivation (the angle chain of one-sample t statistics, the spending functions) is in docs/sequential.md.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import optimize, stats
from scipy.optimize import elementwise

GRID_CELLS = 160  # cells of the angle grid (the tests check the spending by Monte Carlo)
EXACT_FROM = 1e-7  # increments below this get the marginal (conservative) boundary
SPENDING = {"obrien_fleming": "O'Brien-Fleming", "pocock": "Pocock"}  # Lan-DeMets spending types


def spent_alpha(fraction, alpha: float, spending: str = "obrien_fleming"):
    """Two-sided alpha spent by information ``fraction`` (Lan-DeMets, of ``spending`` type)."""
    fraction = np.asarray(fraction, dtype=float)
    if spending == "pocock":
        return alpha * np.log1p((np.e - 1) * np.clip(fraction, 0.0, None))
    if spending != "obrien_fleming":
        raise ValueError(f"spending={spending!r}; choose from {', '.join(SPENDING)}")
    with np.errstate(divide="ignore"):
        return np.where(fraction > 0, 4 * stats.norm.sf(stats.norm.isf(alpha / 4) / np.sqrt(fraction)), 0.0)


def normal_boundaries(fractions, alpha: float, points: int = 801, spending: str = "obrien_fleming") -> np.ndarray:
    """|Z| boundaries of the spending function for normal statistics at these fractions.

    The recursion of Armitage, McPherson and Rowe on the score scale
    ``S = Z sqrt(t)`` (independent normal increments): the density of S on
    the continuation region, propagated by Simpson's rule, and each
    boundary the root that spends exactly the look's increment.  The
    reference that the t boundaries converge to; used to show how much
    stricter few seeds make them.
    """
    fractions = np.asarray(fractions, dtype=float)
    increments = np.diff(spent_alpha(fractions, alpha, spending), prepend=0.0)
    boundaries = [stats.norm.isf(increments[0] / 2)]
    edge = boundaries[0] * np.sqrt(fractions[0])
    grid = np.linspace(-edge, edge, points)
    density = stats.norm.pdf(grid, scale=np.sqrt(fractions[0]))
    weights = np.ones(points)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    for previous, fraction, increment in zip(fractions[:-1], fractions[1:], increments[1:]):
        step = np.sqrt(fraction - previous)
        mass = weights * (grid[1] - grid[0]) / 3 * density

        def crossing(edge):
            return mass @ (stats.norm.sf((edge - grid) / step) + stats.norm.cdf((-edge - grid) / step))

        edge = optimize.brentq(lambda e: crossing(e) - increment, 1e-9, grid[-1] + 40 * step, xtol=1e-13)
        boundaries.append(edge / np.sqrt(fraction))
        new_grid = np.linspace(-edge, edge, points)
        density = stats.norm.pdf((new_grid[:, None] - grid) / step) @ mass / step
        grid = new_grid
    return np.array(boundaries)


def t_cdf(dof: int, x) -> np.ndarray:
    """CDF of Student's t with integer ``dof``, in closed form (Abramowitz and Stegun 26.7.3-4).

    Absolute error ~1e-16 and about ten times faster than ``scipy.special.stdtr``,
    which the boundary recursion calls millions of times.
    """
    x = np.asarray(x, dtype=float)
    with np.errstate(invalid="ignore"):
        sine = np.where(np.isinf(x), 1.0, np.abs(x) / np.sqrt(dof + x * x))
        cosine2 = np.where(np.isinf(x), 0.0, dof / (dof + x * x))
    if dof % 2:
        term = sine * np.sqrt(cosine2)
        total = np.arctan2(sine, np.sqrt(cosine2))
        for k in range(1, (dof - 1) // 2 + 1):
            total = total + term
            term = term * cosine2 * (2 * k) / (2 * k + 1)
        central = 2 / np.pi * total
    else:
        term, central = sine, np.zeros_like(sine)
        for k in range(1, dof // 2 + 1):
            central = central + term
            term = term * cosine2 * (2 * k - 1) / (2 * k)
    return 0.5 + 0.5 * np.sign(x) * central


def _probability_above(level, sine, n: int) -> np.ndarray:
    """P(sin(theta_{n+1}) > level | sin(theta_n) = sine) for one more seed (docs/sequential.md).

    ``h(rho) = (sqrt(n) sine + rho) / sqrt(1 + rho^2)`` must exceed
    ``g = level sqrt(n + 1)``; ``h`` runs from -1 to +1 with one extremum, so
    the set is one half-line when ``|g| < 1`` and an interval (or its
    complement) otherwise, bounded by the roots of
    ``(1 - g^2) rho^2 + 2 a rho + a^2 - g^2`` on the side where ``a + rho``
    has the sign of ``g``.  ``sqrt(n) rho`` is t with n dof.
    """
    a = np.sqrt(n) * sine
    g = level * np.sqrt(n + 1)
    quadratic, linear, constant = 1 - g * g, 2 * a, a * a - g * g
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.maximum(linear * linear - 4 * quadratic * constant, 0.0))
        half = -0.5 * (linear + np.copysign(root, linear))
        first, second = half / quadratic, constant / half
        low, high = np.minimum(first, second), np.maximum(first, second)
        low_valid, high_valid = (a + low) * g >= 0, (a + high) * g >= 0
    cdf_low, cdf_high = t_cdf(n, low * np.sqrt(n)), t_cdf(n, high * np.sqrt(n))
    half_line = 1 - np.where(high_valid, cdf_high, cdf_low)
    between = np.where(low_valid & high_valid & (root > 0), cdf_high - cdf_low, 0.0)
    return np.where(np.abs(g) < 1, half_line, np.where(g > 0, between, 1 - between))


def _angle_grid(edge) -> np.ndarray:
    """Cell edges on (-edge, edge) per level, finest near the edges where crossing mass sits."""
    return np.asarray(edge, dtype=float)[..., None] * np.sin(np.linspace(-np.pi / 2, np.pi / 2, GRID_CELLS + 1))


def _middles(edges: np.ndarray) -> np.ndarray:
    return np.sin(0.5 * (edges[..., 1:] + edges[..., :-1]))


def _step(edges: np.ndarray, mass: np.ndarray, new_edges: np.ndarray, n: int) -> np.ndarray:
    """Mass in each new cell after one more seed (each old cell's mass at its midpoint)."""
    above = _probability_above(np.sin(new_edges)[..., None, :], _middles(edges)[..., :, None], n)
    return np.einsum("...c,...cj->...j", mass, above[..., :-1] - above[..., 1:])


@lru_cache(maxsize=1024)
def _chain(seeds: tuple[int, ...], increments: tuple[tuple[float, ...], ...]) -> tuple:
    """Boundaries (levels, looks) and the chain's state after the last look.

    ``increments[look][level]``; the state after a look (cell edges and
    masses on the continuation region, per level) is cached, so a study that
    adds one look at a time integrates each step once.
    """
    spend = np.array(increments[-1])
    n = seeds[-1]
    if len(seeds) == 1:
        boundary = stats.t.isf(spend / 2, n - 1)
        edges = _angle_grid(np.arctan(boundary / np.sqrt(n - 1)))
        mass = np.diff(t_cdf(n - 1, np.sqrt(n - 1) * np.tan(edges)), axis=-1)
        return boundary[:, None], edges, mass
    previous, edges, mass = _chain(seeds[:-1], increments[:-1])
    for count in range(seeds[-2], n - 1):  # seed counts without a look
        edges, mass = (
            _angle_grid(np.full(len(spend), np.pi / 2)),
            _step(edges, mass, _angle_grid(np.full(len(spend), np.pi / 2)), count),
        )
    middles = _middles(edges)

    def excess(angle, level):
        sine = np.sin(angle)[:, None]
        crossing = (
            _probability_above(sine, middles[level], n - 1) + 1 - _probability_above(-sine, middles[level], n - 1)
        )
        return (mass[level] * crossing).sum(axis=-1) - spend[level]

    marginal = stats.t.isf(spend / 2, n - 1)
    exact = spend >= EXACT_FROM
    angle = np.arctan(marginal / np.sqrt(n - 1))
    if exact.any():
        levels = np.flatnonzero(exact)
        root = elementwise.find_root(
            excess, (np.full(levels.size, 1e-12), np.full(levels.size, np.pi / 2 - 1e-12)), args=(levels,)
        )
        if not root.success.all():
            raise ArithmeticError(f"no boundary for seeds {seeds}, increments {spend}")
        angle[levels] = root.x
    boundary = np.where(exact, np.sqrt(n - 1) * np.tan(angle), marginal)
    new_edges = _angle_grid(angle)
    return (np.concatenate([previous, boundary[:, None]], axis=1), new_edges, _step(edges, mass, new_edges, n - 1))


def paired_t_boundaries(seeds, increments) -> np.ndarray:
    """|T| boundaries of one-sample t-tests at looks with these numbers of seeds.

    ``seeds`` increase (the first at least 2); ``increments`` is (looks,) or
    (looks, levels): under no effect, with normal per-seed differences, the
    boundaries cross first at look k with probability ``increments[k]``
    exactly (an increment of 0 gives an infinite boundary).  Increments below
    ``EXACT_FROM`` get the marginal t quantile, which spends at most the
    increment.  Returns (looks,) or (levels, looks).
    """
    seeds = tuple(int(n) for n in seeds)
    if seeds[0] < 2 or any(b <= a for a, b in zip(seeds, seeds[1:])):
        raise ValueError(f"paired looks need increasing seed counts from 2, got {seeds}")
    increments = np.asarray(increments, dtype=float)
    single = increments.ndim == 1
    key = tuple(tuple(float(v) for v in np.atleast_1d(row)) for row in increments)
    boundaries = _chain(seeds, key)[0]
    return boundaries[0] if single else boundaries
