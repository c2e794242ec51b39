"""SAR: spatial autoregression with self-token prediction (config, backbone, model, presets).

Reads bottom-up as DiT's models.py: the config, helpers, attention masks, the block, the
backbone, the model, then the size presets. The heads live in flow_head.py (flow matching)
and ddpm_head.py (the DDPM ablation), the guidance in guidance.py, the groupings in grouping.py.
"""
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from .choices import HEAD_PREDICTIONS, HEADS
from .ddpm_head import DDPMHead
from .flow_head import FlowHead
from .grouping import INJECTIONS, make_grouping, resolve_scales
from .guidance import Guidance

HEAD_CLASSES = {"flow": FlowHead, "ddpm": DDPMHead}  # the class of each of models.choices.HEADS
assert set(HEAD_CLASSES) == set(HEADS)

COND, CONTEXT, GENERATION = 0, 1, 2  # stream ids: the class token, context_stream, generation_stream


@dataclass
class SARConfig:
    token_dim: int = 16          # KL-VAE kl16: 16 channels, patch 1 (paper Table 3, main space)
    height: int = 16             # token grid rows (256 px / stride 16)
    width: int = 16              # token grid columns
    grouping: str = "next-neighbour"  # best FID with Agg_AVG (paper Fig. 8 table); 31 steps at 16x16
    injection: str = "avg"       # next-neighbour's h: 'avg' (Agg_AVG) | 'se' (Agg_SE, FID 58.49; grouping.py)
    scales: tuple[int, ...] | str | None = None  # next-scale sides, or 'powers-of-two' | 'var-10' (resolved
                                 # to sides for `height`, grouping.py); None -> (1, 2, 4, ..., height)
    num_classes: int = 1000
    depth: int = 12
    hidden_size: int = 768       # backbone width (DiT's name; `width` is the token grid's)
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1   # trains the unconditional backbone for CFG / z-CFG (DESIGN 3)
    head: str = "flow"           # 'flow' (flow matching) | 'ddpm' (MAR's diffusion loss): paper Table 3
    head_depth: int = 3          # residual AdaLN blocks in the head (MAR SimpleMLPAdaLN)
    head_width: int = 1024       # MAR's diffloss width
    head_batch_mul: int = 4      # t samples per token per step (MAR diffusion_batch_mul)
    z_dropout: float = 0.1       # z -> 0 trains the unconditional head branch for x-CFG (paper Fig. 12)
    flow_steps: int = 50         # ODE steps from t=0 (noise) to t=1 (data); ddpm: respaced steps
    time_schedule: str = "uniform"  # sampler grid: 'uniform' | 'shifted' (SD3 time shift toward noise)
    time_shift: float = 3.0      # shift s for 'shifted': sigma' = s*sigma / (1 + (s-1)*sigma), SD3 eq. 23
    train_time: str = "uniform"  # training t: 'uniform' | 'logit_normal' (SD3's logit-normal, m=0 s=1)
    train_time_loc: float = 0.0  # logit_normal's m and s (JiT: -0.8, 0.8, toward the noise)
    train_time_scale: float = 1.0
    # What the flow head's network outputs: 'v' the velocity x - e (DESIGN 3), or 'x' the clean token,
    # turned into v = (x_hat - x_t) / (1 - t) for the same loss and sampler (JiT, Li & He 2025: a
    # network narrow against its token's dimension cannot carry the noise through; predicting x it
    # need not). 1 - t is clipped at x_pred_eps.
    head_prediction: str = "v"
    x_pred_eps: float = 0.05
    attention: str = "auto"      # 'auto' (= sdpa: at 513 tokens masked SDPA trained SAR-B at 449 img/s on an
                                 # H100, FlexAttention 350 eager / 445 compiled) | 'flex' | 'sdpa'; flex on CPU
                                 # compiles and is inference-only (torch 2.13 has no CPU flex backward)
    grad_checkpointing: bool = False  # recompute each block in backward (activation checkpointing)

    # Names an older release wrote into checkpoints, and what they are called now.
    RENAMED = {"width_dim": "hidden_size"}

    def __post_init__(self):
        self.scales = resolve_scales(self.scales, self.height)
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from {HEADS}")
        if self.head_prediction not in HEAD_PREDICTIONS:
            raise ValueError(f"unknown head_prediction {self.head_prediction!r}; choose from {HEAD_PREDICTIONS}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"unknown injection {self.injection!r}; choose from {INJECTIONS}")

    @classmethod
    def check_fields(cls, names):
        """Raise ValueError naming the first name that is not a SARConfig field."""
        known = {f.name for f in fields(cls)}
        for name in names:
            if name not in known and name not in cls.RENAMED:
                raise ValueError(f"unknown model field {name!r}; fields: {', '.join(sorted(known))}")

    @classmethod
    def from_dict(cls, d):
        """A config from a dict (a preset with overrides, or a checkpoint's meta.json); unknown keys are errors."""
        cls.check_fields(d)
        return cls(**{cls.RENAMED.get(k, k): v for k, v in d.items()})

    def to_dict(self):
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def sincos_2d(coords, dim, grid):
    """Fixed 2-D sin-cos embedding (L, dim) of normalised (row, col) coordinates in [0, 1]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=coords.device) / (dim // 4))
    out = []
    for axis in range(2):
        angle = coords[:, axis, None].double() * grid * omega          # in finest-grid units
        out += [angle.sin(), angle.cos()]
    return torch.cat(out, 1).float()                                    # (L, dim)


def group_causal_mask(q_stream, q_group, k_stream, k_group, single_stream):
    """True where a query may attend a key (DESIGN 3); broadcasts, and serves as a flex mask_mod.

    cond attends to itself; a context token of group t to cond and context groups <= t; a
    generation token of group t to cond, context groups < t and generation tokens of group t.
    Single (shift-aligned) stream: a generation token of group t attends generation groups <= t.
    """
    q_ctx, q_gen = q_stream == CONTEXT, q_stream == GENERATION
    k_ctx, k_gen = k_stream == CONTEXT, k_stream == GENERATION
    gen_gen = (k_group <= q_group) if single_stream else (k_group == q_group)
    return ((k_stream == COND)
            | (q_ctx & k_ctx & (k_group <= q_group))
            | (q_gen & k_ctx & (k_group < q_group))
            | (q_gen & k_gen & gen_gen))


_BLOCK_MASKS = {}
_FLEX = None


def flex_block_mask(stream, group, single_stream, key):
    """FlexAttention BlockMask of the group-causal rule, built once per (grouping, seq, device)."""
    if key not in _BLOCK_MASKS:
        def mask_mod(b, h, q, k):
            return group_causal_mask(stream[q], group[q], stream[k], group[k], single_stream)
        S = stream.numel()
        _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, S, S, device=stream.device)
    return _BLOCK_MASKS[key]


class PrefixMask(NamedTuple):
    """A dense (N, N) mask whose first `prefix` queries (cond and context_stream) attend only the
    first `prefix` keys, as two blocks: head (prefix, prefix) and tail (N - prefix, N)."""
    head: torch.Tensor
    tail: torch.Tensor
    prefix: int


def prefix_attention(q, k, v, mask, tail_only=False):
    """Masked attention as one call under the whole mask, but the first `mask.prefix` queries skip
    the keys after the prefix, which the mask forbids them: in the two-stream sequence the context
    stream never attends the generation stream, so a quarter of the score matrix is not computed.
    tail_only: the outputs of the queries after the prefix only."""
    p = mask.prefix
    tail = F.scaled_dot_product_attention(q[:, :, p:], k, v, attn_mask=mask.tail)  # (B, H, N - p, C/H)
    if tail_only:
        return tail
    head = F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], attn_mask=mask.head)
    return torch.cat([head, tail], 2)                                   # (B, H, N, C/H)


def flex(q, k, v, block_mask):
    """Compiled flex_attention (the eager path materialises the whole score matrix)."""
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention)
    return _FLEX(q, k, v, block_mask=block_mask)


class KVCache:
    """Keys/values of the tokens later groups attend (cond, context_stream) and their (stream, group),
    preallocated for `capacity` positions.

    A decode step's tokens are [cond | context(G_{t-1}); generation(G_t)], the ones later steps
    attend first. Each layer writes the step's N keys/values after the `length` kept ones and
    attends [:length + N]; `advance(kept)` then keeps the first `kept`, so the next step overwrites
    a two-stream step's generation entries. Nothing is concatenated: a [past; new] per layer and
    step would copy the whole cache each time (a fifth of a 16x16 decode on CPU).
    """

    def __init__(self, depth, capacity):
        self.kv = [None] * depth
        self.capacity, self.length = capacity, 0
        self.stream = self.group = None                                # (capacity,) each

    def extend(self, layer, k, v):
        """Write k, v (B, H, N, C/H) after the kept entries; return the keys/values to attend
        (B, H, length + N, C/H), views of the buffers."""
        B, H, N, Dh = k.shape
        if self.kv[layer] is None:
            self.kv[layer] = (k.new_empty(B, H, self.capacity, Dh), v.new_empty(B, H, self.capacity, Dh))
        keys, values = self.kv[layer]
        end = self.length + N
        keys[:, :, self.length:end], values[:, :, self.length:end] = k, v
        return keys[:, :, :end], values[:, :, :end]

    def extend_meta(self, stream, group):
        """The same for the (stream, group) of the step's N tokens: those of the keys (length + N,)."""
        if self.stream is None:
            self.stream, self.group = stream.new_empty(self.capacity), group.new_empty(self.capacity)
        end = self.length + stream.numel()
        self.stream[self.length:end], self.group[self.length:end] = stream, group
        return self.stream[:end], self.group[:end]

    def advance(self, kept):
        self.length += kept


#################################################################################
#                                 Backbone                                      #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention over [cached keys; new tokens] with a group-causal mask."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, mask, cache=None, layer=0, tail_only=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:                                            # (B, H, N, C/H) each
            k, v = cache.extend(layer, k, v)                             # (B, H, S, C/H)
        if isinstance(mask, BlockMask):
            x = flex(q, k, v, mask)
        elif isinstance(mask, PrefixMask):
            x = prefix_attention(q, k, v, mask, tail_only)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, C/H)
        return self.proj(x.transpose(1, 2).reshape(B, x.shape[2], C))   # (B, N, C); tail_only (B, N - p, C)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config):
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, config.hidden_size))

    def forward(self, x, mask, cache=None, layer=0, tail_only=False):
        a = self.attn(self.norm1(x), mask, cache, layer, tail_only)     # (B, N, C)
        x = (x[:, mask.prefix:] if tail_only else x) + a
        return x + self.mlp(self.norm2(x))                              # (B, N, C); tail_only (B, N - p, C)


class Backbone(nn.Module):
    """Stack of blocks over [cond] + context_stream + generation_stream; optional KV cache."""

    def __init__(self, config):
        super().__init__()
        self.grad_checkpointing = config.grad_checkpointing
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)

    def forward(self, x, mask, cache=None):
        """Outputs (B, N, C); under a PrefixMask (the one pass over two streams) those after the
        prefix only, (B, N - prefix, C): the last block leaves out the cond and context_stream
        outputs, which nothing reads."""
        for i, block in enumerate(self.blocks):
            tail_only = isinstance(mask, PrefixMask) and i == len(self.blocks) - 1
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, cache, i, tail_only, use_reentrant=False)
            else:
                x = block(x, mask, cache, i, tail_only)                  # (B, N, C)
        return self.norm(x)


#################################################################################
#                                  SAR model                                    #
#################################################################################

def gaussian_noise(shape, generator, device):
    """Standard normal (B, N, D); a list of generators draws each sample from its own."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


class SARModel(nn.Module):
    """Self-token prediction: group-causal backbone giving z per token, flow head sampling tokens.

    Class conditioning is a condition token (the `[cond]` prefix of DESIGN 3) rather than AdaLN:
    it is the sequence layout the group-causal mask is defined on, it is computed once and kept
    in the KV cache at sampling, and it keeps the backbone a plain causal transformer (AdaLN
    would add 6 W^2 parameters per block and a per-block modulation of every cached token).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grouping = make_grouping(config.grouping, config.height, config.width, config.scales, config.injection)
        self.single_stream = self.grouping.shift_aligned
        W, g = config.hidden_size, self.grouping
        self.input_proj = nn.Linear(config.token_dim, W)
        self.start_token = nn.Parameter(torch.zeros(W))             # input of the first group
        self.class_embed = nn.Embedding(config.num_classes + 1, W)  # last row: the null class
        self.stream_embed = nn.Embedding(3, W)                      # cond, context, generation
        self.scale_embed = nn.Embedding(len(g.scales), W) if g.scales else None
        pos = sincos_2d(g.coords, W, max(config.height, config.width))
        self.register_buffer("pos_embed", pos, persistent=False)    # (L, W)
        self.backbone = Backbone(config)
        self.head = HEAD_CLASSES[config.head](config)
        self.initialize_weights()

    def initialize_weights(self):
        # Transformer and head linears: xavier, zero bias (DiT).
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        # Embeddings and the start token: small normal.
        for p in [self.class_embed.weight, self.stream_embed.weight, self.start_token]:
            nn.init.normal_(p, std=0.02)
        if self.scale_embed is not None:
            nn.init.normal_(self.scale_embed.weight, std=0.02)
        self.head.initialize_weights()

    # ---- class conditioning -------------------------------------------------------------
    def null_labels(self, labels):
        return torch.full_like(labels, self.config.num_classes)

    def class_dropout_mask(self, labels):
        """Which examples train the unconditional backbone (the null class): drawn in training only."""
        if not self.training or self.config.class_dropout == 0:
            return torch.zeros_like(labels, dtype=torch.bool)
        return torch.rand(labels.shape, device=labels.device) < self.config.class_dropout

    def _condition_labels(self, labels, drop_labels):
        """Labels with the dropped ones replaced by the null class (a fresh draw when None)."""
        if drop_labels is None:
            drop_labels = self.class_dropout_mask(labels)
        return torch.where(drop_labels, self.null_labels(labels), labels)

    # ---- sequence assembly --------------------------------------------------------------
    def _embed(self, values, positions, stream):
        """Token values (B, P, D) at sequence positions (P,) -> embeddings (B, P, W)."""
        x = self.input_proj(values)                                      # (B, P, W)
        if stream == GENERATION:                                         # first group: start token
            first = self.grouping.tensors(values.device)["group_index"][positions] == 0
            x = torch.where(first[:, None], self.start_token.to(x.dtype), x)
        x = x + self.pos_embed[positions] + self.stream_embed.weight[stream]
        if self.scale_embed is not None:
            x = x + self.scale_embed(self.grouping.tensors(values.device)["scale_index"][positions])
        return x

    def _tokens(self, x, labels, context_pos, generation_pos):
        """[cond] + context_stream + generation_stream embeddings (B, S, W) and their (stream, group).

        x (B, L, D) are tokens in sequence order; only groups before each generation token's
        group are read through the dependency injection. labels None: no cond token.
        """
        device = x.device
        group_index = self.grouping.tensors(device)["group_index"]
        parts, stream, group = [], [], []
        if labels is not None:
            parts.append(self.class_embed(labels)[:, None] + self.stream_embed.weight[COND])  # (B, 1, W)
            stream.append(torch.full((1,), COND, device=device))
            group.append(torch.full((1,), -1, device=device))
        if context_pos is not None and context_pos.numel():
            parts.append(self._embed(x[:, context_pos], context_pos, CONTEXT))
            stream.append(torch.full_like(context_pos, CONTEXT))
            group.append(group_index[context_pos])
        h = self.grouping.dependency_injection(x, generation_pos)       # (B, P, D)
        parts.append(self._embed(h, generation_pos, GENERATION))
        stream.append(torch.full_like(generation_pos, GENERATION))
        group.append(group_index[generation_pos])
        return torch.cat(parts, 1), torch.cat(stream), torch.cat(group)

    def layout(self, device):
        """(stream, group) of each position of the one-pass sequence [cond] + context + generation."""
        group_index = self.grouping.tensors(device)["group_index"]
        streams = [GENERATION] if self.single_stream else [CONTEXT, GENERATION]
        stream = torch.cat([torch.full((1,), COND, device=device)]
                           + [torch.full_like(group_index, s) for s in streams])
        group = torch.cat([torch.full((1,), -1, device=device)] + [group_index] * len(streams))
        return stream, group

    def attention_mask(self, device, backend=None, split=False):
        """Mask of the one-pass sequence: a BlockMask (flex) or bool (S, S) (sdpa), built once.

        split: with sdpa and two streams, the bool mask as a PrefixMask at cond + context_stream
        (which attend nothing after them), for `prefix_attention`.
        """
        device = torch.device(device)
        backend = backend or self.config.attention
        if backend == "auto":
            backend = "sdpa"
        g = self.grouping
        stream, group = self.layout(device)
        key = (backend, g.name, g.height, g.width, g.scales, stream.numel(), str(device))
        if backend == "flex":
            return flex_block_mask(stream, group, self.single_stream, key)
        if backend != "sdpa":
            raise ValueError(f"unknown attention backend {backend!r}")
        if key not in _BLOCK_MASKS:
            _BLOCK_MASKS[key] = group_causal_mask(
                stream[:, None], group[:, None], stream[None], group[None], self.single_stream)
        mask = _BLOCK_MASKS[key]
        if not split or self.single_stream:
            return mask
        if key + ("split",) not in _BLOCK_MASKS:
            p = 1 + g.seq_len
            _BLOCK_MASKS[key + ("split",)] = PrefixMask(mask[:p, :p].contiguous(), mask[p:].contiguous(), p)
        return _BLOCK_MASKS[key + ("split",)]

    # ---- training -----------------------------------------------------------------------
    def forward(self, x, labels, *, drop_labels=None):
        """One pass over all groups (paper Fig. 2, bottom): z (B, L, W) at generation positions.

        drop_labels (B,) bool marks the examples conditioned on the null class; None draws the
        class dropout afresh (in training only).
        """
        B, L, D = x.shape
        labels = self._condition_labels(labels, drop_labels)
        positions = torch.arange(L, device=x.device)
        context_pos = None if self.single_stream else positions
        seq, _, _ = self._tokens(x, labels, context_pos, positions)     # (B, S, W)
        h = self.backbone(seq, self.attention_mask(x.device, split=True))  # (B, S, W); two streams: (B, L, W)
        return h[:, -L:]                                                # (B, L, W)

    def forward_group(self, x, labels, t):
        """z (B, n_t, W) of group t from its own forward over the prefix (Fig. 2 top: naive);
        labels are used as given (no class dropout)."""
        g = self.grouping
        sl = g.group_slice(t)
        if self.single_stream:
            context_pos, generation_pos = None, torch.arange(sl.stop, device=x.device)
        else:
            context_pos = torch.arange(sl.start, device=x.device)
            generation_pos = torch.arange(sl.start, sl.stop, device=x.device)
        seq, stream, group = self._tokens(x, labels, context_pos, generation_pos)
        mask = group_causal_mask(stream[:, None], group[:, None], stream[None], group[None], self.single_stream)
        return self.backbone(seq, mask)[:, -(sl.stop - sl.start):]      # (B, n_t, W)

    # ---- sampling -----------------------------------------------------------------------
    def _decode_step(self, x, labels, t, cache):
        """z (B, n_t, W) of group t in one backbone call: feeds [context(G_{t-1}); generation(G_t)]."""
        g, device = self.grouping, x.device
        sl = g.group_slice(t)
        generation_pos = torch.arange(sl.start, sl.stop, device=device)
        context_pos = None
        if t > 0 and not self.single_stream:
            prev = g.group_slice(t - 1)
            context_pos = torch.arange(prev.start, prev.stop, device=device)
        seq, stream, group = self._tokens(x, labels if t == 0 else None, context_pos, generation_pos)
        k_stream, k_group = cache.extend_meta(stream, group)            # (S_cache + N,)
        mask = group_causal_mask(stream[:, None], group[:, None], k_stream[None], k_group[None],
                                 self.single_stream)                    # (N, S_cache + N)
        h = self.backbone(seq, mask, cache=cache)                       # (B, N, W)
        # Keep cond and context K/V (they come first); generation K/V only in the single
        # stream, where later groups attend them.
        n_t = generation_pos.numel()
        cache.advance(seq.shape[1] - (0 if self.single_stream else n_t))
        return h[:, -n_t:]                                              # (B, n_t, W)

    def new_cache(self):
        """An empty KV cache for one decode: at most cond + L tokens are kept or attended at a step."""
        return KVCache(self.config.depth, 1 + self.grouping.seq_len)

    @torch.no_grad()
    def decode_teacher_forced(self, x, labels):
        """z (B, L, W) group by group through the KV cache on ground truth x (equals forward())."""
        cache = self.new_cache()
        return torch.cat([self._decode_step(x, labels, t, cache)
                          for t in range(self.grouping.num_groups)], 1)

    @torch.no_grad()
    def generate(self, labels, *, seeds, guidance=None, flow_steps=None, use_cache=True, solver="euler",
                 temperature=1.0, compile_head=False):
        """Tokens (B, L, D), one group per step; sample i's noise comes from its own seed.

        solver, temperature and compile_head go to the head's sampler (flow_head.py, ddpm_head.py).
        """
        guidance = guidance or Guidance()
        g, device = self.grouping, labels.device
        B, D = labels.shape[0], self.config.token_dim
        seeds = seeds.tolist() if torch.is_tensor(seeds) else list(seeds)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        two = guidance.needs_uncond_backbone
        cond_labels = torch.cat([labels, self.null_labels(labels)]) if two else labels
        x = torch.zeros(B, g.seq_len, D, device=device)
        cache = self.new_cache() if use_cache else None
        for t in range(g.num_groups):
            x_in = torch.cat([x, x]) if two else x
            if use_cache:
                z = self._decode_step(x_in, cond_labels, t, cache)      # (B or 2B, n_t, W)
            else:
                z = self.forward_group(x_in, cond_labels, t)
            sl = g.group_slice(t)
            shape = (B, sl.stop - sl.start, D)
            noise = gaussian_noise(shape, generators, device)
            x[:, sl] = self.head.sample(z.float(), noise, flow_steps or self.config.flow_steps,
                                        guidance.at_step(t, g.num_groups), solver=solver, temperature=temperature,
                                        compile_head=compile_head,
                                        step_noise=lambda: gaussian_noise(shape, generators, device))
        return x


def count_parameters(model):
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def train_flops_per_image(model):
    """Matmul FLOPs of one training step per image: 6 N tokens for the linears, plus attention
    scores and values (12 S^2 W per layer, dense) and the head at head_batch_mul t per token."""
    c, g = model.config, model.grouping
    S = 1 + g.seq_len * (1 if model.single_stream else 2)
    backbone = count_parameters(model.backbone)
    head = count_parameters(model.head)
    return 6 * backbone * S + 12 * c.depth * S * S * c.hidden_size + 6 * head * g.seq_len * c.head_batch_mul


#################################################################################
#                                  SAR presets                                  #
#################################################################################
# The paper gives only parameter counts (Table 4: 141M / 714M / 1.3B). Widths chosen here,
# counted for the 16x16 grid with KL-VAE 16-dim tokens (next-neighbour, 1000 classes):
#   sar-b: 16 blocks x 768 (12 heads of 64), head 4 x 1024   -> ~139.3M
#   sar-l: 24 blocks x 1536 (24 heads of 64), head 4 x 1024  -> ~707.7M
#   sar-h: 32 blocks x 1792 (28 heads of 64), head 6 x 1536  -> ~1.317B
#   tiny:  2 blocks x 64 (4 heads), head 2 x 64: tests and CPU demos.
#   small: 4 blocks x 96 (4 heads), head 2 x 96, one t per token: a small real set at 32 px on a CPU
#          (configs/mnist.yaml; 0.62M at MNIST's 8x8 grid of 48-dim tokens, ~2.5x tiny's step time).
PRESETS = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=4, head_depth=2, head_width=64, head_batch_mul=2),
    "small": dict(depth=4, hidden_size=96, num_heads=4, head_depth=2, head_width=96, head_batch_mul=1),
    "sar-b": dict(depth=16, hidden_size=768, num_heads=12, head_depth=4, head_width=1024),
    "sar-l": dict(depth=24, hidden_size=1536, num_heads=24, head_depth=4, head_width=1024),
    "sar-h": dict(depth=32, hidden_size=1792, num_heads=28, head_depth=6, head_width=1536),
}


def preset_config(preset, **overrides):
    """SARConfig of a preset with field overrides; unknown presets and fields are errors."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return SARConfig.from_dict({**PRESETS[preset], **overrides})


def build_model(preset, **overrides):
    """SARModel from a preset name and SARConfig field overrides."""
    return SARModel(preset_config(preset, **overrides))
