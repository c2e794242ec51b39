"""Groupings: step counts, sequence order, dependency injection (DESIGN 3, paper Fig. 8)."""
import pytest
import torch

from models import GROUPINGS, SARConfig, build_model, make_grouping, resolve_scales
from models.grouping import VAR_10

INJECTED = [(name, "avg") for name in GROUPINGS] + [("next-neighbour", "se")]


def small(name, injection="avg"):
    return make_grouping(name, 4, 4, (1, 2, 4) if name == "next-scale" else None, injection)


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


@pytest.mark.parametrize("name,injection", INJECTED)
def test_dependency_injection_causal(name, injection):
    """h at group t reads only groups < t; the first group reads nothing (start token)."""
    g = small(name, injection)
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


def test_se_injection_is_one_neighbour_up_else_left():
    """Agg_SE: every row of h has exactly one weight, 1.0, at the up neighbour (else the left one)."""
    g = small("next-neighbour", "se")
    assert g.inject_weight.shape == (16, 1)
    for p in range(1, g.seq_len):                                   # position 0 is the start token
        r, c = g.row[p].item(), g.col[p].item()
        src = g.inject_index[p, 0].item()
        assert g.inject_weight[p, 0] == 1.0
        assert (g.row[src].item(), g.col[src].item()) == ((r - 1, c) if r > 0 else (r, c - 1))
    grid = torch.arange(16.0).view(1, 4, 4, 1)
    h = g.to_grid(g.dependency_injection(g.to_sequence(grid)))[0, ..., 0]
    assert h[1, 1] == grid[0, 0, 1, 0] and h[0, 2] == grid[0, 0, 1, 0] and h[2, 0] == grid[0, 1, 0, 0]
    avg = small("next-neighbour")
    assert avg.to_grid(avg.dependency_injection(avg.to_sequence(grid)))[0, 1, 1, 0] != h[1, 1]


@pytest.mark.parametrize("name", [n for n in GROUPINGS if n != "next-neighbour"])
def test_se_injection_only_for_next_neighbour(name):
    with pytest.raises(ValueError, match="next-neighbour only"):
        small(name, "se")
    with pytest.raises(ValueError, match="unknown injection"):
        SARConfig(injection="max")


def test_named_scale_schedules():
    assert resolve_scales("var-10", 16) == VAR_10 == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert resolve_scales("powers-of-two", 16) == (1, 2, 4, 8, 16)
    assert resolve_scales("var-10", 8) == (1, 2, 3, 4, 5, 7, 8)     # x 8/16, rounded half up
    assert resolve_scales("var-10", 32)[:3] == (1, 2, 4) and resolve_scales("var-10", 32)[-1] == 32
    assert resolve_scales([1, 2, 4], 4) == (1, 2, 4) and resolve_scales(None, 16) is None
    with pytest.raises(ValueError, match="unknown scale schedule"):
        resolve_scales("var-11", 16)
    assert make_grouping("next-scale", 16, 16, "var-10") is make_grouping("next-scale", 16, 16, list(VAR_10))
    assert make_grouping("next-scale", 16, 16, "var-10").num_groups == 10


def test_next_scale_model_builds_with_named_schedule():
    model = build_model("tiny", grouping="next-scale", scales="var-10", num_classes=3)
    assert model.config.scales == VAR_10 and model.config.to_dict()["scales"] == list(VAR_10)
    assert SARConfig.from_dict(model.config.to_dict()) == model.config
    assert model.grouping.seq_len == sum(s * s for s in VAR_10)
    x = torch.randn(1, model.grouping.seq_len, model.config.token_dim)
    with torch.no_grad():
        assert model(x, torch.tensor([1])).shape == (1, model.grouping.seq_len, model.config.hidden_size)
