"""Sites: which ranks share a fast network, found once and agreed on by every rank.

A geo-distributed job is sites (a node, a data centre) joined by a slow WAN, each with one or
more ranks on a fast local network. Two-level synchronization (every step inside a site,
layer-wise across sites) needs every rank to know the same site map, and three process groups
per rank: its site's ranks (``intra``, the per-step gradient all-reduce), the same ranks again
(``gather``, the all-gather that reassembles a cross-site average: it is launched when the
cross-site part finishes, not in backward's order, so it must not share a queue with the
gradients), and the ranks with its own index at every other site (``cross``, one group per
local index, so each carries 1/G of the cross-site traffic).

Where a rank's site comes from, first match wins:

1. ``DREAMDDP_SITE`` — an explicit site id (any integer; sites are numbered in order of their ids);
2. ``ranks_per_site`` (``train.ranks_per_site``) — consecutive global ranks, G per site;
3. torchrun's ``GROUP_RANK`` (its node rank) — one site per node, torchrun's own default;
4. ``NODE_RANK`` — set by ``dreamddp cluster`` and most launchers;
5. otherwise everything is one site.

The map is checked once, on every rank, from everyone's claims (one all-gather): sites of
unequal size, or ranks that disagree on ``ranks_per_site``, are the same one-line ``ValueError``
on every rank — never a hang in a later collective.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

__all__ = ["HIERARCHIES", "SITE_ENV", "Topology", "claim_site", "discover"]

SITE_ENV = "DREAMDDP_SITE"
HIERARCHIES = ("auto", "flat", "hierarchical")  # what a wrapper (train.hierarchy) may ask for


@dataclass(frozen=True)
class Topology:
    """Every rank's site, and this rank's place in it (groups only when built by ``discover``)."""

    site_of: tuple[int, ...]  # global rank -> site index (0..sites-1)
    rank: int
    intra: Any = field(default=None, compare=False)  # dist.ProcessGroup of this rank's site
    cross: Any = field(default=None, compare=False)  # dist.ProcessGroup of this local index across sites
    gather: Any = field(default=None, compare=False)  # dist.ProcessGroup of this rank's site, for all-gathers

    @property
    def sites(self) -> int:
        return max(self.site_of) + 1

    @property
    def ranks_per_site(self) -> int:
        return len(self.site_of) // self.sites

    @property
    def site(self) -> int:
        return self.site_of[self.rank]

    def members(self, site: int) -> list[int]:
        """Global ranks of ``site``, in rank order (a rank's local index is its place here)."""
        return [r for r, s in enumerate(self.site_of) if s == site]

    @property
    def local(self) -> int:
        return self.members(self.site).index(self.rank)

    def peers(self, local: int) -> list[int]:
        """Global ranks with local index ``local``, one per site, in site order."""
        return [self.members(s)[local] for s in range(self.sites)]

    def describe(self) -> str:
        sites, ranks = self.sites, self.ranks_per_site
        return f"{sites} site{'s' * (sites != 1)} x {ranks} rank{'s' * (ranks != 1)}"

    @property
    def hierarchical(self) -> bool:
        """More than one rank per site and more than one site: two levels are worth having."""
        return self.sites > 1 and self.ranks_per_site > 1


def claim_site(rank: int, ranks_per_site: int | None = None, env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(where it came from, site id) for this rank; see the module docstring for the order."""
    env = os.environ if env is None else env
    for name in (SITE_ENV,):
        if env.get(name, "").strip():
            return name, _int_env(name, env[name])
    if ranks_per_site:
        return "ranks_per_site", rank // ranks_per_site
    for name in ("GROUP_RANK", "NODE_RANK"):
        if env.get(name, "").strip():
            return name, _int_env(name, env[name])
    return "default", 0


def site_map(claims: list[tuple[str, int, int | None]]) -> tuple[int, ...]:
    """Every rank's (source, site id, ranks_per_site) -> global rank -> site index; one-line errors."""
    per_site = {c[2] for c in claims}
    if len(per_site) > 1:
        shown = ", ".join(f"rank {r}: {c[2]}" for r, c in enumerate(claims))
        raise ValueError(f"ranks disagree on ranks_per_site ({shown}); give every rank the same train.ranks_per_site")
    ids = sorted({c[1] for c in claims})
    index = {site_id: i for i, site_id in enumerate(ids)}
    site_of = tuple(index[c[1]] for c in claims)
    sizes = [site_of.count(s) for s in range(len(ids))]
    if len(set(sizes)) > 1:
        source = claims[0][0]
        detail = ", ".join(f"site {ids[s]}: {n}" for s, n in enumerate(sizes))
        raise ValueError(
            f"sites have unequal numbers of ranks ({detail}; from {source}); every site needs the same "
            "number of ranks (set DREAMDDP_SITE or train.ranks_per_site to group them evenly)"
        )
    expected = per_site.pop()
    if expected and len(site_of) % expected:
        raise ValueError(f"ranks_per_site={expected} does not divide the world size {len(site_of)}")
    return site_of


def discover(
    group: dist.ProcessGroup | None = None, ranks_per_site: int | None = None, *, with_groups: bool = True
) -> Topology:
    """Every rank's site, agreed by one all-gather, and this rank's intra- and cross-site groups.

    Collective: every rank of the world calls it, in the same order as its other collectives
    (``new_group`` is collective too: all sites' and all local indices' groups are created on
    every rank, in the same order, as torch requires). ``with_groups=False``, or a topology
    that is not hierarchical, creates no group (the map alone costs one all-gather).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    problem = None
    try:
        source, site_id = claim_site(rank, ranks_per_site)
    except ValueError as err:  # shared below, so that no rank waits for one that gave up
        problem, source, site_id = str(err), "", 0
    claims: list[Any] = [None] * world
    dist.all_gather_object(claims, (source, site_id, ranks_per_site, problem), group=group)
    for r, claim in enumerate(claims):
        if claim[3] is not None:
            raise ValueError(claim[3] if r == rank else f"rank {r}: {claim[3]}")
    topology = Topology(site_map([(c[0], c[1], c[2]) for c in claims]), rank)
    if not with_groups or not topology.hierarchical:
        return topology
    global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
    intra = cross = gather = None
    for s in range(topology.sites):
        members = [global_ranks[r] for r in topology.members(s)]
        created, for_gathers = dist.new_group(members), dist.new_group(members)
        if s == topology.site:
            intra, gather = created, for_gathers
    for local in range(topology.ranks_per_site):
        created = dist.new_group([global_ranks[r] for r in topology.peers(local)])
        if local == topology.local:
            cross = created
    return Topology(topology.site_of, rank, intra, cross, gather)


def _int_env(name: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer site id") from None
