"""Token groupings G_1..G_T and their dependency injections h(G_<t) (paper Fig. 8, DESIGN 3).

Injections of next-neighbour (the paper's Fig. 8 table: Agg_AVG FID 4.40, Agg_SE FID 58.49):
    avg   Agg_AVG, the mean of the already-made 4-neighbours of a cell (up and left).
    se    Agg_SE. The paper does not define it; this project reads it as a single neighbour
          instead of the average: the up neighbour when it is made, else the left one, with
          no averaging. Every other grouping has one injection of its own and rejects "se".

Next-scale schedules (`scales`): a list of sides, or a name resolved against the grid side:
    powers-of-two   1, 2, 4, ..., side (VAR / FlexVAR style; the default)
    var-10          VAR / FlexVAR's 10 scales 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 (the refinement
                    paper's "Step 10"), defined for a 16x16 grid. For another side each scale
                    is multiplied by side / 16 and rounded half up, 1 and the side are always
                    included, and duplicates are dropped: 8 -> 1, 2, 3, 4, 5, 7, 8.
"""
import math

import torch
import torch.nn.functional as F

from .choices import GROUPINGS, INJECTIONS, SCALE_SCHEDULES  # noqa: F401 - re-exported

SHIFT_ALIGNED = ("next-token", "next-row", "next-scale")  # paper eq. 12: single stream, cost 1x
VAR_10 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)                # VAR / FlexVAR, for a 16x16 grid


class Grouping:
    """An ordered partition of an h x w grid (or a scale pyramid) plus its injection h."""

    def __init__(self, name, height, width, scales=None, injection="avg"):
        if name not in GROUPINGS:
            raise ValueError(f"unknown grouping {name!r}; choose from {GROUPINGS}")
        if injection not in INJECTIONS:
            raise ValueError(f"unknown injection {injection!r}; choose from {INJECTIONS}")
        if injection != "avg" and name != "next-neighbour":
            raise ValueError(f"injection {injection!r} is defined for next-neighbour only; {name} has its own "
                             f"injection (paper Fig. 8), leave injection at 'avg'")
        self.name, self.height, self.width, self.injection = name, height, width, injection
        self.shift_aligned = name in SHIFT_ALIGNED
        if name == "next-scale":
            scales = resolve_scales(scales, height) or _default_scales(height)
            if height != width or scales[-1] != height or list(scales) != sorted(scales):
                raise ValueError(f"next-scale needs a square grid and increasing scales ending at {height}")
            self.scales = scales
            self._build_scales()
        else:
            self.scales = None
            self._build_grid()
        self.group_sizes = torch.bincount(self.group_index).tolist()
        self.num_groups = len(self.group_sizes)
        self.seq_len = int(self.group_index.numel())
        self.group_starts = [0] + torch.tensor(self.group_sizes).cumsum(0).tolist()
        self._sparsify(self._injection_matrix)
        del self._injection_matrix
        self._device_tensors = {}

    # ---- construction -------------------------------------------------------------------
    def _build_grid(self):
        """Group id per grid cell, the sequence order, and h as a dense (L, L) matrix."""
        h, w = self.height, self.width
        i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        i, j = i.flatten(), j.flatten()
        # Ring distance from the centre: for even sides the centre 2x2 is ring 0, so a 16x16
        # grid has max(h, w) / 2 = 8 rings (paper Table in Fig. 8).
        di = (i.double() - (h - 1) / 2).abs().floor().long()
        dj = (j.double() - (w - 1) / 2).abs().floor().long()
        cell_group = {
            "next-token": i * w + j,
            "next-row": i,
            "next-layer": torch.maximum(di, dj),
            "next-neighbour": i + j,
        }[self.name]
        cell_group = torch.unique(cell_group, return_inverse=True)[1]  # dense ids 0..T-1
        # Sequence is grouped in order; within a group, raster order.
        order = torch.argsort(cell_group * (h * w) + i * w + j)
        self.order = order                                   # (L,) flat grid index of each position
        self.inverse_order = torch.argsort(order)            # (L,) position of each grid cell
        self.group_index = cell_group[order]
        self.row, self.col = i[order], j[order]
        self.coords = torch.stack([(self.row + 0.5) / h, (self.col + 0.5) / w], -1).float()
        self.scale_index = torch.zeros(h * w, dtype=torch.long)

        L = h * w
        pos = self.inverse_order.view(h, w)                  # grid cell -> sequence position
        m = torch.zeros(L, L)
        for p in range(L):
            r, c, g = self.row[p].item(), self.col[p].item(), self.group_index[p].item()
            if g == 0:
                continue                                     # first group: learned start token
            if self.name == "next-token":                    # h = G_{t-1}: the previous token
                m[p, p - 1] = 1.0
            elif self.name == "next-row":                    # h = G_{t-1}: row above, same column
                m[p, pos[r - 1, c]] = 1.0
            elif self.name == "next-layer":                  # Agg_NN: nearest cell of the inner ring
                lo_i, hi_i = _ring_box(h, g - 1)
                lo_j, hi_j = _ring_box(w, g - 1)
                m[p, pos[min(max(r, lo_i), hi_i), min(max(c, lo_j), hi_j)]] = 1.0
            else:                                            # made up/left neighbours
                made = [pos[a, b] for a, b in ((r - 1, c), (r, c - 1)) if a >= 0 and b >= 0]
                if self.injection == "se":                   # Agg_SE: the first made one, up else left
                    m[p, made[0]] = 1.0
                else:                                        # Agg_AVG: their mean
                    for q in made:
                        m[p, q] = 1.0 / len(made)
        self._injection_matrix = m

    def _build_scales(self):
        """Scale maps s_1..s_K in sequence; h = bicubic upsample of the previous scale (VAR)."""
        sizes = [s * s for s in self.scales]
        self.order = self.inverse_order = None
        self.group_index = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
        rows, cols, coords = [], [], []
        for s in self.scales:
            i, j = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            rows.append(i.flatten()), cols.append(j.flatten())
            coords.append(torch.stack([(i.flatten() + 0.5) / s, (j.flatten() + 0.5) / s], -1))
        self.row, self.col = torch.cat(rows), torch.cat(cols)
        self.coords = torch.cat(coords).float()
        self.scale_index = self.group_index.clone()
        L = sum(sizes)
        starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
        m = torch.zeros(L, L)
        for k in range(1, len(self.scales)):
            a, b = self.scales[k - 1], self.scales[k]
            basis = torch.eye(a * a).view(a * a, 1, a, a)    # upsampling is linear: image of a basis
            up = F.interpolate(basis, size=(b, b), mode="bicubic", align_corners=False)
            m[starts[k]:starts[k + 1], starts[k - 1]:starts[k]] = up.view(a * a, b * b).T
        self._injection_matrix = m

    def _sparsify(self, m):
        """Store h as (L, K) source indices and weights: h(x)_p = sum_k w[p, k] x[idx[p, k]]."""
        k = max(int((m != 0).sum(1).max()), 1)
        idx = m.abs().topk(k, dim=1).indices
        self.inject_index = idx
        self.inject_weight = torch.gather(m, 1, idx)

    # ---- public API ---------------------------------------------------------------------
    def to_sequence(self, grid):
        """(B, h, w, D) grid -> (B, L, D) tokens in group order (next-scale: the area pyramid)."""
        B, h, w, D = grid.shape
        if self.scales is None:
            return grid.reshape(B, h * w, D)[:, self.tensors(grid.device)["order"]]
        x = grid.permute(0, 3, 1, 2)                                        # (B, D, h, w)
        maps = [F.interpolate(x, size=(s, s), mode="area") if s != h else x for s in self.scales]
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # (B, L, D)

    def to_grid(self, seq):
        """(B, L, D) sequence -> (B, h, w, D) grid (next-scale: the last, full scale)."""
        B, L, D = seq.shape
        if self.scales is None:
            return seq[:, self.tensors(seq.device)["inverse_order"]].reshape(B, self.height, self.width, D)
        return seq[:, -self.height * self.width:].reshape(B, self.height, self.width, D)

    def dependency_injection(self, x, positions=None):
        """h(G_<t) at the given sequence positions from tokens x (B, L, D); zero on the first group."""
        dev = self.tensors(x.device)
        idx, w = dev["inject_index"], dev["inject_weight"].to(x.dtype)
        if positions is not None:
            idx, w = idx[positions], w[positions]
        return torch.einsum("bpkd,pk->bpd", x[:, idx], w)                  # (B, P, D)

    def tensors(self, device):
        """The index tensors on `device` (copied once per device)."""
        device = torch.device(device)
        if device not in self._device_tensors:
            names = ("group_index", "scale_index", "inject_index", "inject_weight", "order", "inverse_order")
            self._device_tensors[device] = {n: getattr(self, n).to(device) for n in names
                                            if getattr(self, n) is not None}
        return self._device_tensors[device]

    def group_slice(self, t):
        """Sequence positions of group t."""
        return slice(self.group_starts[t], self.group_starts[t + 1])

    def __repr__(self):
        return f"Grouping({self.name}, {self.height}x{self.width}, T={self.num_groups}, L={self.seq_len})"


def _default_scales(side):
    """Powers of two up to the side, e.g. 16 -> (1, 2, 4, 8, 16) (VAR/FlexVAR style)."""
    return tuple(sorted({min(2 ** k, side) for k in range(int(math.ceil(math.log2(side))) + 1)}))


def _var_10(side):
    """VAR's 10-scale schedule for a 16x16 grid, rescaled to `side` (module docstring)."""
    return tuple(sorted({1, side} | {max(1, math.floor(s * side / 16 + 0.5)) for s in VAR_10}))


def resolve_scales(scales, side):
    """A scale schedule as a tuple of sides: a list as given, a name of SCALE_SCHEDULES for a
    grid of `side`, None as None."""
    if scales is None:
        return None
    if isinstance(scales, str):
        if scales not in SCALE_SCHEDULES:
            raise ValueError(f"unknown scale schedule {scales!r}; give a list of sides or one of {SCALE_SCHEDULES}")
        return _default_scales(side) if scales == "powers-of-two" else _var_10(side)
    return tuple(int(s) for s in scales)


def _ring_box(n, r):
    """Index range [lo, hi] along an axis of length n whose centre distance floor(|i-(n-1)/2|) <= r."""
    idx = [i for i in range(n) if math.floor(abs(i - (n - 1) / 2)) <= r]
    return idx[0], idx[-1]


_CACHE = {}


def make_grouping(name, height, width, scales=None, injection="avg"):
    """Build (and memoise) the grouping `name` for an h x w grid; `scales` may be a schedule name."""
    key = (name, height, width, resolve_scales(scales, height) or None, injection)
    if key not in _CACHE:
        with torch.device("cpu"):
            _CACHE[key] = Grouping(name, height, width, key[3], injection)
    return _CACHE[key]
