"""Sites and their process groups (issue 15, item 1): found from the environment, agreed by every rank.

- the claim order: DREAMDDP_SITE, ranks_per_site, torchrun's GROUP_RANK, NODE_RANK, one site;
- 2 sites x 2 ranks on real gloo processes: every rank has the same map, its site's group
  all-reduces within the site only, its cross-site group across sites only;
- unequal sites, ranks that disagree on ranks_per_site and a malformed site id are the same
  one-line error on every rank (no hang).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dreamddp.core.topology import SITE_ENV, Topology, claim_site, discover, site_map

from .dist_utils import run_workers


def test_claim_order() -> None:
    assert claim_site(3, None, {SITE_ENV: "7", "GROUP_RANK": "1"}) == (SITE_ENV, 7)
    assert claim_site(3, 2, {"GROUP_RANK": "0"}) == ("ranks_per_site", 1)
    assert claim_site(3, None, {"GROUP_RANK": "1", "NODE_RANK": "0"}) == ("GROUP_RANK", 1)
    assert claim_site(3, None, {"NODE_RANK": "2"}) == ("NODE_RANK", 2)
    assert claim_site(3, None, {}) == ("default", 0)
    with pytest.raises(ValueError, match=r"DREAMDDP_SITE='east' is not an integer site id"):
        claim_site(0, None, {SITE_ENV: "east"})


def test_site_map_numbers_sites_in_id_order_and_refuses_uneven_ones() -> None:
    claims = [(SITE_ENV, 20, None), (SITE_ENV, 10, None), (SITE_ENV, 20, None), (SITE_ENV, 10, None)]
    topology = Topology(site_map(claims), rank=2)
    assert topology.site_of == (1, 0, 1, 0) and topology.sites == 2 and topology.ranks_per_site == 2
    assert topology.members(1) == [0, 2] and topology.local == 1 and topology.peers(1) == [3, 2]
    assert topology.hierarchical
    with pytest.raises(ValueError, match=r"unequal numbers of ranks \(site 0: 3, site 1: 1; from NODE_RANK\)"):
        site_map([("NODE_RANK", 0, None)] * 3 + [("NODE_RANK", 1, None)])
    with pytest.raises(ValueError, match=r"disagree on ranks_per_site \(rank 0: 2, rank 1: 1"):
        site_map([("ranks_per_site", 0, 2), ("ranks_per_site", 1, 1)])
    assert not Topology(site_map([("default", 0, None)] * 4), rank=0).hierarchical


def _groups(rank: int, world: int, env_site: str) -> dict:
    if env_site:
        os.environ[SITE_ENV] = env_site.split(",")[rank]
    topology = discover(ranks_per_site=None if env_site else 2)
    mine = torch.tensor([float(10**rank)])
    intra, cross = mine.clone(), mine.clone()
    dist.all_reduce(intra, group=topology.intra)
    dist.all_reduce(cross, group=topology.cross)
    return {"map": list(topology.site_of), "local": topology.local, "intra": intra.item(), "cross": cross.item()}


@pytest.mark.slow  # 4 ranks
@pytest.mark.parametrize("env_site", ["", "5,9,5,9"])
def test_two_sites_of_two_ranks_get_their_groups(env_site: str) -> None:
    out = run_workers(_groups, 4, env_site, timeout=90)
    site_of = out[0]["map"]
    assert all(o["map"] == site_of for o in out)
    assert site_of == ([0, 0, 1, 1] if not env_site else [0, 1, 0, 1])
    for rank, o in enumerate(out):
        same_site = [r for r in range(4) if site_of[r] == site_of[rank]]
        assert o["intra"] == sum(10**r for r in same_site)
        peers = [r for r in range(4) if [x for x in range(4) if site_of[x] == site_of[r]].index(r) == o["local"]]
        assert o["cross"] == sum(10**r for r in peers) and len(peers) == 2


def _bad(rank: int, world: int, case: str) -> str:
    if case == "uneven":
        os.environ[SITE_ENV] = "0" if rank < 3 else "1"
    elif case == "malformed":
        os.environ[SITE_ENV] = "east" if rank == 1 else "0"
    try:
        discover(ranks_per_site=(2 if rank else 1) if case == "disagree" else None)
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.parametrize(
    "case,expected",
    [
        ("uneven", "sites have unequal numbers of ranks (site 0: 3, site 1: 1; from DREAMDDP_SITE)"),
        ("disagree", "ranks disagree on ranks_per_site (rank 0: 1, rank 1: 2, rank 2: 2, rank 3: 2)"),
        ("malformed", "DREAMDDP_SITE='east' is not an integer site id"),
    ],
)
@pytest.mark.slow  # 4 ranks each
def test_bad_site_maps_are_one_line_on_every_rank(case: str, expected: str) -> None:
    messages = run_workers(_bad, 4, case, timeout=90)
    for message in messages:
        assert expected in message and "\n" not in message, messages
