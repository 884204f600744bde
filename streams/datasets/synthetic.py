"""A seeded, Criteo-shaped synthetic click stream with a known ground truth and scheduled drift.

Why synthetic at all: the public logs are samples without click times, and no real log
says what the *true* click probability was, when its distribution changed, or which field
became informative. This stream does, so the pipeline can be graded against the truth:

* **features**: categorical fields ``C1..Cn`` (default 26, with Kaggle Criteo's per-field
  cardinalities) drawn from Zipf laws, some often missing; numeric fields ``I1..Im``
  (default 13) as heavy-tailed counts, often missing. A fraction ``new_id_fraction`` of the
  values of every field (and of the users) is *born* at a random event index: before it, the
  value never appears; after it, it takes its Zipf share (ids new over time, as in real logs).
  Value ids are 8-hex-digit strings like Criteo's (a bijective hash of the popularity rank);
* **ground truth**: ``logit = bias + sum of per-(field, value) effects over the informative
  fields + pairwise interactions + numeric effects (on log1p counts) + user effect + ad
  effect - position_decay * position``; each effect is a deterministic hash of
  ``(seed, field, value)`` turned into a normal draw, so no table of the vocabulary is ever
  stored (memory is constant whatever the cardinalities). ``bias`` is solved per regime so
  the mean CTR is ``base_ctr``. ``Impression.oracle_ctr`` is the true probability and the
  label is Bernoulli(oracle_ctr);
* **scheduled concept drift** at event index ``drift_at`` (default half-way):
  ``n_drift_fields`` informative fields become pure noise (:attr:`~SyntheticStream.fading_fields`)
  and as many noise fields become informative (:attr:`~SyntheticStream.emerging_fields`);
  ``drift_fields`` is their union. Also ``n_new_ads`` new ads appear and take
  ``new_ad_share`` of the traffic. The mean CTR stays at ``base_ctr`` on both sides, so
  only a model that tracks *which* fields matter can follow it;
* **delayed clicks** from :class:`~ctr.streams.datasets.base.ClickDelay`: log-normal with mean
  ``click_delay_mean_ms`` of event time, plus ``late_click_fraction`` of clicks after the
  ``attribution_window_ms``;
* **event time**: a Poisson process at ``events_per_second`` from ``start_ms``.

**Profiles** (:data:`PROFILES`) are named sets of :class:`SyntheticConfig` defaults, chosen
with ``open_source("synthetic:PROFILE")`` or :meth:`SyntheticConfig.from_profile`; explicit
options override the profile's values:

=========== ===============================================================================
profile     stream
=========== ===============================================================================
``default`` Criteo-shaped at ``base_ctr=0.1``, 100k users; strong signal (best achievable
            AUC near the best published Criteo models)
``low-ctr`` real-ad-log regime: ``base_ctr=0.005``; ``n_users=1_000_000`` with a Zipf
            popularity (``user_zipf_exponent=0.8``), so most users are seen once or never;
            weak signal (effect scales about half the default's); drift on
=========== ===============================================================================

Generation is vectorised with numpy in chunks of ``chunk_size`` events and only then turned
into :class:`~ctr.infra.schema.Impression` objects, one chunk at a time (constant memory).
:meth:`SyntheticStream.chunks` exposes the numpy chunks directly for vectorised consumers.

>>> stream = SyntheticStream(SyntheticConfig(seed=1, n_events=20_000, n_categorical=6,
...                                          n_numeric=2, cardinalities=(50, 200, 1000, 20, 5, 300)))
>>> events = list(stream)
>>> len(events), events[0].impression.event_id, sorted(events[0].impression.categorical)[:2]
(20000, 'syn1-0', ['C1', 'C2'])
>>> stream.drift_at, len(stream.drift_fields)
(10000, 4)
>>> 0.05 < sum(e.clicked for e in events) / len(events) < 0.15
True
>>> 0.6 < best_auc(events) < 1.0
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import numpy as np

from ctr.infra.schema import Impression
from ctr.online_learner.metrics import roc_auc
from ctr.streams.datasets.base import DEFAULT_ATTRIBUTION_WINDOW_MS, ClickDelay, LabeledImpression, Source

#: Distinct values per field in the Kaggle Criteo training set (C1..C26), the default vocabulary.
CRITEO_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

PRE, POST = 0, 1
#: The ``HEAD`` most popular values of every field exist from the start (no field is empty).
HEAD = 10
#: Fields with at most this many values are preferred for informative/drift roles, so the
#: signal lives where a learner can see each value often enough to learn it.
LEARNABLE_CARDINALITY = 100_000

#: Named presets of :class:`SyntheticConfig` defaults (see the module's table), applied by
#: :meth:`SyntheticConfig.from_profile` and ``open_source("synthetic:PROFILE")``.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    # Real ad logs: clicks are rare, users many and mostly one-off, and the signal is weak.
    "low-ctr": {
        "base_ctr": 0.005,
        "n_users": 1_000_000,
        # Below 1 so that no single user takes a large share of 1M users' traffic.
        "user_zipf_exponent": 0.8,
        # About half the default scales: best achievable AUC ~0.65-0.72 instead of ~0.82.
        "effect_scale": 0.2,
        "interaction_scale": 0.2,
        "numeric_scale": 0.15,
        "user_scale": 0.2,
        "ad_scale": 0.25,
        "position_decay": 0.15,
    },
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of :class:`SyntheticStream`; defaults give a Criteo-like stream.

    A *profile* (:data:`PROFILES`, the module's table) is a named set of other defaults:
    :meth:`from_profile` starts from it and applies explicit overrides on top. ``default`` is
    this class's own defaults; ``low-ctr`` is a real-ad-log regime (``base_ctr=0.005``,
    ``n_users=1_000_000`` with a Zipf popularity of exponent ``user_zipf_exponent=0.8``, effect
    scales about half the default's), drift kept on.

    >>> SyntheticConfig(n_events=1_000).resolved_drift_at
    500
    >>> SyntheticConfig(n_categorical=3).resolved_cardinalities
    (1460, 583, 10131227)
    >>> low = SyntheticConfig.from_profile("low-ctr", base_ctr=0.002)
    >>> low.base_ctr, low.n_users, low.drift
    (0.002, 1000000, True)
    """

    seed: int = 0
    #: Events to generate; ``None`` = endless.
    n_events: int | None = 1_000_000
    #: Rate of *event time* (a Poisson process), not of generation.
    events_per_second: float = 1_000.0
    start_ms: int = 1_700_000_000_000
    id_prefix: str | None = None  # default f"syn{seed}"

    # --- features
    n_categorical: int = 26
    n_numeric: int = 13
    #: Values per categorical field; default Criteo's (cycled/truncated to ``n_categorical``).
    cardinalities: tuple[int, ...] | None = None
    zipf_exponent: float = 1.1
    #: Fraction of each field's values (and users) born part-way through the stream.
    new_id_fraction: float = 0.1
    #: Births are spread uniformly over this many events (default: ``n_events`` or 1M).
    id_horizon: int | None = None
    #: About a third of categorical fields, and every numeric one, have a missing rate up to this.
    max_missing_rate: float = 0.4
    n_users: int = 100_000
    #: Zipf exponent of user popularity; ``None`` = ``zipf_exponent``. Below 1 the head is
    #: flatter (no single user takes a large share) while most users stay rare.
    user_zipf_exponent: float | None = None
    n_ads: int = 2_000
    n_positions: int = 4

    # --- ground truth (defaults: best achievable AUC ~0.82, vs ~0.80-0.81 for the best
    # published models on Criteo; lower the *_scale knobs for a harder stream)
    base_ctr: float = 0.1
    n_informative: int = 8
    effect_scale: float = 0.4
    n_interactions: int = 2
    interaction_scale: float = 0.4
    n_informative_numeric: int = 3
    numeric_scale: float = 0.3
    user_scale: float = 0.3
    ad_scale: float = 0.4
    position_decay: float = 0.3

    # --- drift
    drift: bool = True
    #: Event index of the drift; default half of ``n_events`` (or of ``id_horizon`` if endless).
    drift_at: int | None = None
    n_drift_fields: int = 2
    n_new_ads: int = 500
    new_ad_share: float = 0.3

    # --- delayed clicks
    click_delay_mean_ms: float = 5_000.0
    click_delay_sigma: float = 1.0
    late_click_fraction: float = 0.02
    late_click_mean_ms: float = 60_000.0
    attribution_window_ms: int = DEFAULT_ATTRIBUTION_WINDOW_MS

    chunk_size: int = 8_192

    @classmethod
    def from_profile(cls, profile: str | None = None, **overrides: Any) -> SyntheticConfig:
        """The config of :data:`PROFILES` ``[profile]`` (``None`` = ``"default"``) with ``overrides``.

        >>> SyntheticConfig.from_profile() == SyntheticConfig()
        True
        >>> SyntheticConfig.from_profile("high-ctr")
        Traceback (most recent call last):
        ...
        ValueError: unknown synthetic profile 'high-ctr'; known profiles: default, low-ctr
        """
        name = "default" if profile is None else profile
        if name not in PROFILES:
            raise ValueError(f"unknown synthetic profile {name!r}; known profiles: {', '.join(PROFILES)}")
        return cls(**{**PROFILES[name], **overrides})

    def __post_init__(self) -> None:
        if self.n_events is not None and self.n_events < 0:
            raise ValueError("n_events must be >= 0 or None")
        if self.n_categorical < 1 or self.n_numeric < 0:
            raise ValueError("need n_categorical >= 1 and n_numeric >= 0")
        if self.cardinalities is not None:
            if len(self.cardinalities) != self.n_categorical:
                raise ValueError(
                    f"cardinalities has {len(self.cardinalities)} entries for {self.n_categorical} fields"
                )
            if min(self.cardinalities) < 1 or max(self.cardinalities) >= 2**32:
                raise ValueError("cardinalities must be in [1, 2**32)")
        if not 0.0 < self.base_ctr < 1.0:
            raise ValueError("base_ctr must be in (0, 1)")
        if self.zipf_exponent <= 0 or (self.user_zipf_exponent is not None and self.user_zipf_exponent <= 0):
            raise ValueError("zipf_exponent and user_zipf_exponent must be positive")
        for name in ("new_id_fraction", "max_missing_rate", "new_ad_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if min(self.n_users, self.n_ads, self.n_positions, self.chunk_size) < 1 or self.n_new_ads < 0:
            raise ValueError("n_users, n_ads, n_positions, chunk_size must be >= 1 and n_new_ads >= 0")
        if min(self.n_informative, self.n_informative_numeric, self.n_drift_fields) < 0:
            raise ValueError("n_informative, n_informative_numeric and n_drift_fields must be >= 0")
        if self.drift and self.drifting_fields > self.informative_count:
            raise ValueError(
                f"n_drift_fields={self.n_drift_fields} needs as many informative fields, "
                f"got n_informative={self.n_informative}"
            )
        if self.events_per_second <= 0:
            raise ValueError("events_per_second must be positive")

    @property
    def drifting_fields(self) -> int:
        """Fields that fade (and as many that emerge): ``n_drift_fields``, at most half the fields."""
        return min(self.n_drift_fields, self.n_categorical // 2) if self.drift else 0

    @property
    def informative_count(self) -> int:
        """``n_informative``, capped so ``drifting_fields`` noise fields remain to emerge."""
        return min(self.n_informative, self.n_categorical - min(self.n_drift_fields, self.n_categorical // 2))

    @property
    def resolved_cardinalities(self) -> tuple[int, ...]:
        if self.cardinalities is not None:
            return tuple(self.cardinalities)
        n = len(CRITEO_CARDINALITIES)
        return tuple(CRITEO_CARDINALITIES[i % n] for i in range(self.n_categorical))

    @property
    def horizon(self) -> int:
        if self.id_horizon is not None:
            return self.id_horizon
        return self.n_events if self.n_events else 1_000_000

    @property
    def resolved_drift_at(self) -> int | None:
        if not self.drift:
            return None
        if self.drift_at is not None:
            return self.drift_at
        return (self.n_events if self.n_events is not None else self.horizon) // 2

    def click_delay(self) -> ClickDelay:
        return ClickDelay(
            self.click_delay_mean_ms,
            sigma=self.click_delay_sigma,
            late_fraction=self.late_click_fraction,
            late_mean_ms=self.late_click_mean_ms,
            window_ms=self.attribution_window_ms,
            seed=self.seed,
        )


@dataclass(frozen=True)
class SyntheticChunk:
    """One vectorised chunk of events; row ``k`` is event ``start + k``.

    Categorical values are popularity ranks (``-1`` = missing), numerics are counts
    (``NaN`` = missing), ``ad`` indexes ads (``>= n_ads`` = an ad born at the drift),
    ``click_delay_ms`` is ``-1`` where not clicked.

    >>> stream = SyntheticStream(seed=0, n_events=10_000, n_categorical=3, n_numeric=1,
    ...                          cardinalities=(5, 50, 500), chunk_size=4_096)
    >>> [(c.start, len(c), c.regime) for c in stream.chunks()]
    [(0, 4096, 0), (4096, 904, 0), (5000, 4096, 1), (9096, 904, 1)]
    >>> chunk = next(stream.chunks())
    >>> chunk.categorical.shape, chunk.clicked.dtype, bool((chunk.categorical < 5_000).all())
    ((4096, 3), dtype('bool'), True)
    """

    start: int
    regime: int
    event_time_ms: np.ndarray
    categorical: np.ndarray
    numeric: np.ndarray
    user: np.ndarray
    ad: np.ndarray
    position: np.ndarray
    oracle_ctr: np.ndarray
    clicked: np.ndarray
    click_delay_ms: np.ndarray

    def __len__(self) -> int:
        return int(self.categorical.shape[0])


# --------------------------------------------------------------------------- hashing
# splitmix64's finaliser: a cheap, well-mixed, vectorisable hash. Every random quantity
# tied to a value (effect, birth time, printed id) is a hash of it, so nothing is stored.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_53 = 1.0 / float(1 << 53)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def _hash(values: np.ndarray, salt: int) -> np.ndarray:
    return _mix(values.astype(np.uint64) ^ np.uint64(salt))


def _uniform(h: np.ndarray) -> np.ndarray:
    """(0, 1) from a 64-bit hash."""
    return ((h >> _S11).astype(np.float64) + 0.5) * _TWO_53


def _normal(h: np.ndarray) -> np.ndarray:
    """A standard normal per hash (Box-Muller on two derived uniforms)."""
    u1, u2 = _uniform(h), _uniform(_mix(h))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


_HEX = np.array([ord(c) for c in "0123456789abcdef"], dtype=np.uint32)
_NIBBLE_SHIFTS = np.arange(28, -4, -4, dtype=np.uint32)


def _id32(values: np.ndarray, salt: int) -> np.ndarray:
    """A bijection of [0, 2**32) keyed by ``salt``: distinct ranks give distinct ids."""
    x = values.astype(np.uint32)
    x = x * np.uint32(0x9E3779B1) + np.uint32(salt & 0xFFFFFFFF)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    return x


def _hex_strings(ids: np.ndarray, prefix: str = "") -> np.ndarray:
    """uint32 ids -> array of ``prefix + 8 hex digits``, same shape.

    Built as UCS-4 code points and viewed as a numpy unicode array: no Python formatting per id.
    """
    shape = ids.shape
    flat = ids.reshape(-1)
    width = len(prefix) + 8
    out = np.empty((flat.shape[0], width), dtype=np.uint32)
    if prefix:
        out[:, : len(prefix)] = np.array([ord(c) for c in prefix], dtype=np.uint32)
    out[:, len(prefix) :] = _HEX[(flat[:, None] >> _NIBBLE_SHIFTS) & np.uint32(0xF)]
    return out.view(f"<U{width}").reshape(shape)


# --------------------------------------------------------------------------- ground truth


class GroundTruth:
    """The hidden click model of a :class:`SyntheticStream` (see module doc).

    ``informative[regime]`` lists the categorical field indexes that carry signal before
    (``PRE``) and after (``POST``) the drift; :meth:`ctr` evaluates either regime on any
    chunk, e.g. the pre-drift oracle on post-drift data.

    >>> stream = SyntheticStream(seed=0, n_events=4_000, n_categorical=4, n_numeric=0,
    ...                          cardinalities=(5, 50, 500, 8), n_informative=2, n_drift_fields=1)
    >>> truth = stream.truth
    >>> truth.informative[PRE] != truth.informative[POST]
    True
    >>> late = list(stream.chunks())[-1]  # a post-drift chunk
    >>> bool((truth.ctr(late) == late.oracle_ctr).all())
    True
    >>> bool((truth.ctr(late, PRE) != late.oracle_ctr).any())
    True
    """

    def __init__(self, config: SyntheticConfig) -> None:
        c = config
        self.config = c
        rng = np.random.default_rng([c.seed, 2])
        self.cardinalities = np.array(c.resolved_cardinalities, dtype=np.int64)
        nf = c.n_categorical

        def salts(n: int) -> list[int]:
            return [int(s) for s in rng.integers(0, 2**63, size=n)]

        # Informative and drift roles go to learnable fields first (see LEARNABLE_CARDINALITY).
        order = [int(i) for i in rng.permutation(nf)]
        learnable = [i for i in order if self.cardinalities[i] <= LEARNABLE_CARDINALITY]
        order = [*learnable, *(i for i in order if i not in learnable)]
        k, n_inf = c.drifting_fields, c.informative_count
        informative = order[:n_inf]
        self.fading = tuple(sorted(informative[:k]))
        self.stable = tuple(sorted(informative[k:]))
        self.emerging = tuple(sorted(order[n_inf : n_inf + k]))
        self.informative = (
            tuple(sorted(informative)),
            tuple(sorted((*self.stable, *self.emerging))) if c.drift else tuple(sorted(informative)),
        )
        self.effect_salt = {(PRE, f): s for f, s in zip(range(nf), salts(nf), strict=True)}
        for f in range(nf):
            # Stable fields keep their effects; emerging ones get fresh effects after the drift.
            self.effect_salt[(POST, f)] = self.effect_salt[(PRE, f)]
        for f, s in zip(self.emerging, salts(len(self.emerging)), strict=True):
            self.effect_salt[(POST, f)] = s
        pairs = [(a, b) for i, a in enumerate(self.stable) for b in self.stable[i + 1 :]]
        rng.shuffle(pairs)
        pair_salts = salts(len(pairs))
        self.interactions = [
            (a, b, s) for (a, b), s in zip(pairs[: c.n_interactions], pair_salts, strict=False)
        ]
        self.birth_salt = salts(nf + 1)  # last: users
        self.id_salt = salts(nf + 2)  # last two: users, ads
        self.user_salt, self.ad_salt = salts(2)
        # Roughly a third of categorical fields are often missing, as in Criteo.
        often = rng.random(nf) < 0.35
        self.cat_missing = np.where(often, rng.uniform(0.0, c.max_missing_rate, nf), 0.0)
        nn = c.n_numeric
        self.num_missing = rng.uniform(0.0, c.max_missing_rate, nn)
        self.num_mu = rng.uniform(0.0, 4.0, nn)
        self.num_sigma = rng.uniform(0.5, 2.0, nn)
        beta = np.zeros(nn)
        chosen: np.ndarray | list[int] = []
        if nn:
            chosen = rng.choice(nn, size=min(c.n_informative_numeric, nn), replace=False)
        beta[chosen] = c.numeric_scale * rng.choice([-1.0, 1.0], size=len(chosen))
        self.num_beta = beta
        self.bias = (0.0, 0.0)  # solved by SyntheticStream once features can be sampled

    def logit(self, chunk: SyntheticChunk, regime: int, *, with_bias: bool = True) -> np.ndarray:
        c = self.config
        n = len(chunk)
        z = np.full(n, self.bias[regime] if with_bias else 0.0)
        cat = chunk.categorical
        for f in self.informative[regime]:
            r = cat[:, f]
            z += np.where(r >= 0, c.effect_scale * _normal(_hash(r, self.effect_salt[(regime, f)])), 0.0)
        for a, b, salt in self.interactions:
            ra, rb = cat[:, a], cat[:, b]
            h = _mix(_hash(ra, salt) ^ rb.astype(np.uint64))
            z += np.where((ra >= 0) & (rb >= 0), c.interaction_scale * _normal(h), 0.0)
        if c.n_numeric:
            standard = (np.log1p(chunk.numeric) - self.num_mu) / self.num_sigma
            z += np.nan_to_num(standard, nan=0.0) @ self.num_beta
        z += c.user_scale * _normal(_hash(chunk.user, self.user_salt))
        ad_effect = c.ad_scale * _normal(_hash(chunk.ad, self.ad_salt))
        if regime == PRE:  # the pre-drift world has never seen the new ads
            ad_effect = np.where(chunk.ad < c.n_ads, ad_effect, 0.0)
        z += ad_effect
        z -= c.position_decay * chunk.position
        return z

    def ctr(self, chunk: SyntheticChunk, regime: int | None = None) -> np.ndarray:
        """True click probabilities of ``chunk`` under ``regime`` (default: the chunk's own)."""
        return _sigmoid(self.logit(chunk, chunk.regime if regime is None else regime))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _solve_bias(z: np.ndarray, target: float) -> float:
    """b such that mean(sigmoid(b + z)) == target (monotone in b: bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if _sigmoid(mid + z).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --------------------------------------------------------------------------- the stream


class SyntheticStream(Source):
    """Seeded synthetic Criteo-like stream of :class:`~ctr.streams.datasets.base.LabeledImpression`.

    Pass a :class:`SyntheticConfig`, or its fields as keywords. Same config -> identical
    events. Iterating consumes the stream (like every source); :meth:`chunks` restarts
    from the first event each time it is called.

    >>> s = SyntheticStream(seed=3, n_events=1_000, n_categorical=4, n_numeric=1,
    ...                     cardinalities=(10, 20, 30, 40), n_informative=2, n_drift_fields=1)
    >>> ex = next(s)
    >>> ex.impression.event_id, ex.impression.oracle_ctr is not None
    ('syn3-0', True)
    >>> [e.impression.event_id for e in SyntheticStream(s.config)][:2]
    ['syn3-0', 'syn3-1']
    >>> s.fading_fields, s.emerging_fields, s.drift_fields
    (('C1',), ('C3',), ('C1', 'C3'))
    """

    source = "synthetic"

    def __init__(self, config: SyntheticConfig | None = None, **overrides: Any) -> None:
        config = replace(config, **overrides) if config is not None else SyntheticConfig(**overrides)
        super().__init__()  # chunks() stops at n_events itself
        self.config = config
        self.truth = GroundTruth(config)
        self.categorical_names = tuple(f"C{i + 1}" for i in range(config.n_categorical))
        self.numeric_names = tuple(f"I{i + 1}" for i in range(config.n_numeric))
        self.id_prefix = config.id_prefix or f"syn{config.seed}"
        self._calibrate()

    # -- what tests and reports may know about the truth
    @property
    def drift_at(self) -> int | None:
        return self.config.resolved_drift_at

    @property
    def fading_fields(self) -> tuple[str, ...]:
        """Informative before the drift, noise after."""
        return tuple(self.categorical_names[f] for f in self.truth.fading)

    @property
    def emerging_fields(self) -> tuple[str, ...]:
        """Noise before the drift, informative after."""
        return tuple(self.categorical_names[f] for f in self.truth.emerging)

    @property
    def drift_fields(self) -> tuple[str, ...]:
        """Every field whose effect changes at the drift (fading + emerging, sorted by index)."""
        return tuple(self.categorical_names[f] for f in sorted((*self.truth.fading, *self.truth.emerging)))

    def informative_fields(self, regime: int = PRE) -> tuple[str, ...]:
        """Fields carrying signal before (``PRE``) or after (``POST``) the drift."""
        return tuple(self.categorical_names[f] for f in self.truth.informative[regime])

    def ad_ids(self, ads: Sequence[int] | np.ndarray) -> list[str]:
        """Printed ids of ad indexes (``range(n_ads, n_ads + n_new_ads)`` = the new ads)."""
        return _hex_strings(_id32(np.asarray(ads, dtype=np.int64), self.truth.id_salt[-1]), "ad").tolist()

    @property
    def new_ad_ids(self) -> frozenset[str]:
        """Ids of the ads that only exist after the drift."""
        c = self.config
        return frozenset(self.ad_ids(range(c.n_ads, c.n_ads + c.n_new_ads))) if c.drift else frozenset()

    # -- sampling
    def _zipf(self, rng: np.random.Generator, n: int, k: int, a: float | None = None) -> np.ndarray:
        """Ranks in [0, k) with P(rank) ~ (rank + 1) ** -a (continuous inverse-CDF approximation;
        ``a`` defaults to ``zipf_exponent``). Nothing is allocated per rank, so ``k`` may be huge."""
        u = rng.random(n)
        a = self.config.zipf_exponent if a is None else a
        if abs(a - 1.0) < 1e-9:
            x = np.power(k + 1.0, u)
        else:
            x = np.power(1.0 + u * (math.pow(k + 1.0, 1.0 - a) - 1.0), 1.0 / (1.0 - a))
        return np.clip(x.astype(np.int64) - 1, 0, k - 1)

    def _born(self, ranks: np.ndarray, salt: int, index: np.ndarray) -> np.ndarray:
        """Whether each value exists yet at its event index (see ``new_id_fraction``)."""
        c = self.config
        h = _hash(ranks, salt)
        newcomer = (_uniform(h) < c.new_id_fraction) & (ranks >= HEAD)
        birth = (_uniform(_mix(h)) * c.horizon).astype(np.int64)
        return ~newcomer | (birth <= index)

    def _sample_born(
        self, rng: np.random.Generator, index: np.ndarray, k: int, salt: int, a: float | None = None
    ) -> np.ndarray:
        ranks = self._zipf(rng, index.shape[0], k, a)
        if self.config.new_id_fraction <= 0.0 or k <= HEAD:
            return ranks
        for _ in range(32):  # rejection: redraw values not born yet (each round keeps >= 1-f)
            unborn = ~self._born(ranks, salt, index)
            if not unborn.any():
                return ranks
            ranks[unborn] = self._zipf(rng, int(unborn.sum()), k, a)
        ranks[~self._born(ranks, salt, index)] = 0
        return ranks

    def _features(self, rng: np.random.Generator, index: np.ndarray, regime: int) -> SyntheticChunk:
        c, t = self.config, self.truth
        n: int = index.shape[0]  # declared: numpy types a shape's entries Any
        cat = np.empty((n, c.n_categorical), dtype=np.int64)
        for f, k in enumerate(t.cardinalities.tolist()):
            ranks = self._sample_born(rng, index, k, t.birth_salt[f])
            if t.cat_missing[f] > 0:
                ranks[rng.random(n) < t.cat_missing[f]] = -1
            cat[:, f] = ranks
        if c.n_numeric:
            z = rng.standard_normal((n, c.n_numeric))
            num = np.floor(np.exp(t.num_mu + t.num_sigma * z))
            num[rng.random((n, c.n_numeric)) < t.num_missing] = np.nan
        else:
            num = np.empty((n, 0))
        user = self._sample_born(rng, index, c.n_users, t.birth_salt[-1], c.user_zipf_exponent)
        ad = self._zipf(rng, n, c.n_ads)
        if regime == POST and c.n_new_ads:
            new = rng.random(n) < c.new_ad_share
            ad[new] = c.n_ads + self._zipf(rng, int(new.sum()), c.n_new_ads)
        position = rng.integers(0, c.n_positions, n)
        empty = np.empty(0)
        return SyntheticChunk(
            start=int(index[0]) if n else 0,
            regime=regime,
            event_time_ms=empty,
            categorical=cat,
            numeric=num,
            user=user,
            ad=ad,
            position=position,
            oracle_ctr=empty,
            clicked=empty,
            click_delay_ms=empty,
        )

    def _calibrate(self, n: int = 20_000) -> None:
        """Solve each regime's bias so the mean true CTR is ``base_ctr`` (own RNG: the stream
        is unaffected), on features sampled across that regime's span of event indexes."""
        c = self.config
        rng = np.random.default_rng([c.seed, 3])
        drift_at = self.drift_at
        end = c.n_events if c.n_events is not None else c.horizon
        spans = [(0, drift_at if drift_at is not None else end)]
        if drift_at is not None:
            spans.append((drift_at, max(end, drift_at + 1)))
        biases = []
        for regime, (lo, hi) in enumerate(spans):
            index = np.sort(rng.integers(lo, max(hi, lo + 1), n))
            feats = self._features(rng, index, regime)
            biases.append(_solve_bias(self.truth.logit(feats, regime, with_bias=False), c.base_ctr))
        self.truth.bias = (biases[0], biases[-1])

    def chunks(self) -> Iterator[SyntheticChunk]:
        """The stream as numpy chunks, from the first event (deterministic; constant memory)."""
        c = self.config
        rng = np.random.default_rng([c.seed, 1])
        delay = c.click_delay()
        drift_at = self.drift_at
        start, clock_ms = 0, 0.0
        ms_per_event = 1000.0 / c.events_per_second
        while c.n_events is None or start < c.n_events:
            stop = start + c.chunk_size
            if c.n_events is not None:
                stop = min(stop, c.n_events)
            regime = PRE if drift_at is None or start < drift_at else POST
            if regime == PRE and drift_at is not None:
                stop = min(stop, drift_at)  # never straddle the drift
            index = np.arange(start, stop, dtype=np.int64)
            n = stop - start
            offsets = clock_ms + np.cumsum(rng.exponential(ms_per_event, n))
            clock_ms = float(offsets[-1])
            feats = self._features(rng, index, regime)
            p = _sigmoid(self.truth.logit(feats, regime))
            clicked = rng.random(n) < p
            delays = np.full(n, -1, dtype=np.int64)
            delays[clicked] = delay.sample(int(clicked.sum()))
            yield replace(
                feats,
                event_time_ms=c.start_ms + offsets.astype(np.int64),
                oracle_ctr=p,
                clicked=clicked,
                click_delay_ms=delays,
            )
            start = stop

    def _generate(self) -> Iterator[LabeledImpression]:
        t = self.truth
        prefix = self.id_prefix
        cat_names = np.array(self.categorical_names, dtype=object)
        num_names = np.array(self.numeric_names, dtype=object)
        # One bijection per field (a per-field XOR mask): printed ids differ across fields.
        masks = [s & 0xFFFFFFFF for s in t.id_salt[: self.config.n_categorical]]
        field_masks = np.array(masks, dtype=np.uint32)
        for ch in self.chunks():
            users = _hex_strings(_id32(ch.user, t.id_salt[-2]), "u").tolist()
            ads = _hex_strings(_id32(ch.ad, t.id_salt[-1]), "ad").tolist()
            # Feature dicts are built from flat (name, value) streams of the present values
            # only, sliced per event: no filtering of every row in Python.
            present = ch.categorical >= 0
            values = _id32(ch.categorical, 0) ^ field_masks
            pairs = zip(
                np.broadcast_to(cat_names, present.shape)[present].tolist(),
                _hex_strings(values[present]).tolist(),
                strict=True,
            )
            categoricals = [dict(islice(pairs, k)) for k in present.sum(axis=1).tolist()]
            present = ~np.isnan(ch.numeric)
            pairs = zip(
                np.broadcast_to(num_names, present.shape)[present].tolist(),
                ch.numeric[present].tolist(),
                strict=True,
            )
            numerics = [dict(islice(pairs, k)) for k in present.sum(axis=1).tolist()]
            for i, (ts, user, ad, pos, p, clicked, delay, categorical, numeric) in enumerate(
                zip(
                    ch.event_time_ms.tolist(),
                    users,
                    ads,
                    ch.position.tolist(),
                    ch.oracle_ctr.tolist(),
                    ch.clicked.tolist(),
                    ch.click_delay_ms.tolist(),
                    categoricals,
                    numerics,
                    strict=True,
                ),
                ch.start,
            ):
                imp = Impression(
                    event_id=f"{prefix}-{i}",
                    event_time_ms=ts,
                    user_id=user,
                    item_id=ad,
                    position=pos,
                    categorical=categorical,
                    numeric=numeric,
                    oracle_ctr=p,
                )
                yield LabeledImpression(imp, clicked, delay if clicked else None)


# --------------------------------------------------------------------------- metrics
def best_auc(examples: Iterable[LabeledImpression]) -> float:
    """The best AUC any model can expect on ``examples``: the AUC of the true click
    probability (``impression.oracle_ctr``, set by the synthetic stream) against the labels.

    >>> best_auc(SyntheticStream(seed=0, n_events=5_000, n_categorical=3, n_numeric=0,
    ...                          cardinalities=(10, 100, 1000), n_informative=2,
    ...                          n_drift_fields=1)) > 0.6
    True
    """
    scores: list[float] = []
    labels: list[bool] = []
    for ex in examples:
        p = ex.impression.oracle_ctr
        if p is None:
            raise ValueError(
                f"{ex.impression.event_id} has no oracle_ctr (best_auc needs the synthetic stream)"
            )
        scores.append(p)
        labels.append(ex.clicked)
    return roc_auc(np.asarray(labels, dtype=bool), np.asarray(scores))


__all__ = [
    "CRITEO_CARDINALITIES",
    "POST",
    "PRE",
    "PROFILES",
    "GroundTruth",
    "SyntheticChunk",
    "SyntheticConfig",
    "SyntheticStream",
    "best_auc",
]
