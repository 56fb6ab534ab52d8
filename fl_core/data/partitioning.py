"""Patients to clients (by site, or by patient with an optional Dirichlet label skew) and each
client's stratified train/test split of patients."""

from __future__ import annotations

import zlib

import numpy as np

from fl_core.config.model import DataConfig
from fl_core.data.tables import DataError


def site_rng(seed: int, site: str) -> np.random.Generator:
    """The generator of ``site``'s train/test split under ``by_site``: a function of the seed
    and the site's name only, so the split of a site depends on (seed, its patients) and not
    on any other site's data (a hospital computes it alone, docs/data.md)."""
    return np.random.default_rng([seed, zlib.crc32(site.encode("utf-8"))])


def assign_clients(
    ids: np.ndarray, sites: np.ndarray, labels: np.ndarray, config: DataConfig,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Patients → clients as ``data.partition`` says: one client per hospital (``by_site``) or
    ``data.num_clients`` clients, IID or label-skewed Dirichlet(``data.dirichlet_alpha``)
    (``by_patient``). ``ids``, ``sites`` and ``labels`` are per patient; each client's ids
    come sorted. The one partitioning rule: the pipeline's split and the audit's shadow
    federations both use it."""
    if config.partition == "by_site":
        return {str(site): np.sort(ids[sites == site]) for site in sorted(np.unique(sites))}
    return _split_patients(ids, labels, config.num_clients, config.dirichlet_alpha, rng)


def _split_patients(
    ids: np.ndarray, labels: np.ndarray, k: int, alpha: float | None, rng: np.random.Generator,
    min_patients: int = 5, max_tries: int = 1000,
) -> dict[str, np.ndarray]:
    """IID (alpha None) or label-skewed Dirichlet(alpha) assignment of patients to k clients."""
    if k * min_patients > len(ids):
        raise DataError(
            f"data.num_clients={k} needs at least {k * min_patients} patients "
            f"({min_patients} per client); the data has {len(ids)}"
        )
    names = [f"client-{i:03d}" for i in range(k)]
    if alpha is None:
        shuffled = rng.permutation(ids)
        parts = np.array_split(shuffled, k)
        return {n: np.sort(part) for n, part in zip(names, parts, strict=True)}
    for _ in range(max_tries):
        owner = np.empty(len(ids), dtype=np.int64)
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            share = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                owner[part] = client
        if np.bincount(owner, minlength=k).min() >= min_patients:
            return {n: np.sort(ids[owner == i]) for i, n in enumerate(names)}
    raise DataError(
        f"data.dirichlet_alpha={alpha} with {k} clients left a client with fewer than "
        f"{min_patients} patients in {max_tries} draws; raise alpha or lower num_clients"
    )


def _stratified_split(
    ids: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(ids[labels == cls])
        n_test = int(round(test_fraction * len(members)))
        n_test = min(n_test, len(members) - 1)  # keep at least one training patient per class
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
