"""Groupings: step counts, sequence order, dependency injection (DESIGN 3, paper Fig. 8)."""
import pytest
import torch

from models import GROUPINGS, make_grouping


def small(name):
    return make_grouping(name, 4, 4, (1, 2, 4) if name == "next-scale" else None)


@pytest.mark.parametrize("name,steps", [("next-token", 256), ("next-row", 16), ("next-layer", 8),
                                        ("next-neighbour", 31), ("next-scale", 5)])
def test_step_counts_16x16(name, steps):
    g = make_grouping(name, 16, 16)
    assert g.num_groups == steps == len(g.group_sizes)
    assert g.seq_len == (341 if name == "next-scale" else 256) == sum(g.group_sizes)
    assert torch.equal(g.group_index, torch.sort(g.group_index).values)  # grouped in order


def test_step_counts_scale_schedule():
    schedule = (1, 2, 3, 4, 6, 8, 10, 13, 16)
    g = make_grouping("next-scale", 16, 16, schedule)
    assert g.num_groups == len(schedule) and g.group_sizes == [s * s for s in schedule]


def test_group_shapes_4x4():
    assert small("next-layer").group_sizes == [4, 12]
    assert small("next-neighbour").group_sizes == [1, 2, 3, 4, 3, 2, 1]
    assert make_grouping("next-layer", 5, 7).num_groups == 4          # max(h, w) / 2 rounded up


@pytest.mark.parametrize("name", GROUPINGS)
def test_sequence_round_trip(name):
    g = small(name)
    grid = torch.randn(2, 4, 4, 3)
    seq = g.to_sequence(grid)
    assert seq.shape == (2, g.seq_len, 3)
    assert torch.equal(g.to_grid(seq), grid)
    if name == "next-scale":                                          # area pyramid
        assert torch.allclose(seq[:, 0], grid.mean((1, 2)), atol=1e-6)


@pytest.mark.parametrize("name", GROUPINGS)
def test_dependency_injection_causal(name):
    """h at group t reads only groups < t; the first group reads nothing (start token)."""
    g = small(name)
    x = torch.randn(1, g.seq_len, 2)
    for t in range(g.num_groups):
        later = g.group_index >= t
        x2 = x.clone()
        x2[:, later] = torch.randn_like(x2[:, later])
        at_t = g.group_index == t
        assert torch.equal(g.dependency_injection(x)[:, at_t], g.dependency_injection(x2)[:, at_t])
    assert g.dependency_injection(x)[:, g.group_index == 0].abs().max() == 0


def test_dependency_injection_values():
    grid = torch.arange(16.0).view(1, 4, 4, 1)
    g = small("next-neighbour")                                       # Agg_AVG of up / left
    h = g.to_grid(g.dependency_injection(g.to_sequence(grid)))[0, ..., 0]
    assert h[1, 1] == (grid[0, 0, 1, 0] + grid[0, 1, 0, 0]) / 2 and h[0, 2] == grid[0, 0, 1, 0]
    g = small("next-row")                                             # row above
    h = g.to_grid(g.dependency_injection(g.to_sequence(grid)))[0, ..., 0]
    assert torch.equal(h[1:], grid[0, :-1, :, 0])
    g = small("next-layer")                                           # nearest inner-ring cell
    h = g.to_grid(g.dependency_injection(g.to_sequence(grid)))[0, ..., 0]
    assert h[0, 0] == grid[0, 1, 1, 0] and h[0, 2] == grid[0, 1, 2, 0] and h[3, 3] == grid[0, 2, 2, 0]
    g = small("next-token")
    seq = torch.randn(1, 16, 1)
    assert torch.equal(g.dependency_injection(seq)[:, 1:], seq[:, :-1])
    g = small("next-scale")                                           # bicubic upsample, 1x1 -> 2x2
    seq = torch.randn(1, 21, 1)
    assert torch.allclose(g.dependency_injection(seq)[:, 1:5], seq[:, :1].expand(1, 4, 1), atol=1e-6)
