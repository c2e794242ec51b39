"""SAR model: group-causal mask, one-pass vs cached decoding, flow and DDPM heads, solvers, guidance, presets."""
import pytest
import torch

from models import (
    GROUPINGS,
    GUIDANCE_KINDS,
    PRESETS,
    SOLVERS,
    FlowHead,
    Guidance,
    SARConfig,
    build_model,
    count_parameters,
    make_grouping,
    preset_config,
)
from models.ddpm_head import DIFFUSION_STEPS, NoiseSchedule
from models.sar import gaussian_noise

CLASSES = 10
INJECTED = [(name, "avg") for name in GROUPINGS] + [("next-neighbour", "se")]


def tiny(name, **overrides):
    """A tiny random model in eval() on a 4x4 grid (next-scale: (1, 2, 4)), perturbed so that
    the zero-initialised head and AdaLN layers are not trivially zero."""
    torch.manual_seed(0)
    model = build_model("tiny", grouping=name, height=4, width=4, num_classes=CLASSES,
                        scales=(1, 2, 4) if name == "next-scale" else None, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def data(model, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.grouping.seq_len, model.config.token_dim, generator=g)
    return x, torch.arange(batch) % CLASSES


def brute_force_mask(grouping, single_stream):
    """DESIGN 3's rules, written out position by position."""
    L, gi = grouping.seq_len, grouping.group_index.tolist()
    tokens = [("cond", -1)]
    if not single_stream:
        tokens += [("context", gi[p]) for p in range(L)]
    tokens += [("generation", gi[p]) for p in range(L)]
    S = len(tokens)
    mask = torch.zeros(S, S, dtype=torch.bool)
    for a, (qs, qg) in enumerate(tokens):
        for b, (ks, kg) in enumerate(tokens):
            if qs == "cond":
                ok = ks == "cond"
            elif qs == "context":
                ok = ks == "cond" or (ks == "context" and kg <= qg)
            elif single_stream:
                ok = ks == "cond" or (ks == "generation" and kg <= qg)
            else:
                ok = ks == "cond" or (ks == "context" and kg < qg) or (ks == "generation" and kg == qg)
            mask[a, b] = ok
    return mask


@pytest.mark.parametrize("name", GROUPINGS)
def test_causal_attention_mask_matches_rules(name):
    model = tiny(name)
    assert model.single_stream == (name in ("next-token", "next-row", "next-scale"))
    assert torch.equal(model.attention_mask("cpu", "sdpa"), brute_force_mask(model.grouping, model.single_stream))


@pytest.mark.parametrize("name,injection", INJECTED)
def test_causal_forward_and_cache(name, injection):
    """Changing ground truth of groups >= t leaves z of group t unchanged (one-pass and cached),
    and changing group t-1 does change it."""
    model = tiny(name, injection=injection)
    g = model.grouping
    x, labels = data(model)
    with torch.no_grad():
        z, z_cached = model(x, labels), model.decode_teacher_forced(x, labels)
        for t in range(g.num_groups):
            at_t = g.group_index == t
            x2 = x.clone()
            x2[:, g.group_index >= t] += torch.randn_like(x2[:, g.group_index >= t])
            assert torch.allclose(model(x2, labels)[:, at_t], z[:, at_t], atol=1e-5)
            assert torch.allclose(model.decode_teacher_forced(x2, labels)[:, at_t], z_cached[:, at_t], atol=1e-5)
            if t > 0:
                x3 = x.clone()
                x3[:, g.group_index == t - 1] += 1.0
                assert not torch.allclose(model(x3, labels)[:, at_t], z[:, at_t], atol=1e-4)


@pytest.mark.parametrize("name,injection", INJECTED)
def test_cache_teacher_forced_equals_forward(name, injection):
    model = tiny(name, injection=injection)
    x, labels = data(model, batch=3)
    with torch.no_grad():
        z = model(x, labels)
        assert z.shape == (3, model.grouping.seq_len, model.config.hidden_size)
        assert torch.allclose(model.decode_teacher_forced(x, labels), z, atol=1e-4)
        t = model.grouping.num_groups - 1                             # naive per-group forward
        assert torch.allclose(model.forward_group(x, labels, t), z[:, model.grouping.group_index == t], atol=1e-4)


def test_backbone_called_once_per_forward():
    model = tiny("next-neighbour")
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    x, labels = data(model)
    model(x, labels)
    assert len(calls) == 1 and calls[0][1] == 1 + 2 * 16                 # [cond] + 2 streams
    calls.clear()
    model.generate(labels, seeds=[0, 1], flow_steps=2)
    assert len(calls) == model.grouping.num_groups and calls[0][0] == 2
    calls.clear()
    model.generate(labels, seeds=[0, 1], flow_steps=2, guidance=Guidance("x_cfg", w_x=1.5))
    assert len(calls) == model.grouping.num_groups and calls[0][0] == 2  # x-CFG: C + 2c
    calls.clear()
    model.generate(labels, seeds=[0, 1], flow_steps=2, guidance=Guidance("cfg", cfg=2.0))
    assert len(calls) == model.grouping.num_groups and calls[0][0] == 4  # CFG: 2C + 2c


@pytest.mark.parametrize("name", ["next-row", "next-neighbour"])
def test_cache_generate_equals_recompute(name):
    model = tiny(name)
    labels = torch.tensor([1, 7])
    a = model.generate(labels, seeds=[3, 4], flow_steps=3)
    b = model.generate(labels, seeds=[3, 4], flow_steps=3, use_cache=False)
    assert a.shape == (2, model.grouping.seq_len, model.config.token_dim)
    assert torch.allclose(a, b, atol=1e-4)


def test_guidance_unit_weights_equal_unguided():
    model = tiny("next-neighbour")
    labels = torch.tensor([2, 5])
    plain = model.generate(labels, seeds=[7, 8], flow_steps=3)
    for kind in ["cfg", "z_cfg", "x_cfg", "xz_cfg"]:
        guided = model.generate(labels, seeds=[7, 8], flow_steps=3, guidance=Guidance(kind, ramp=True))
        assert torch.allclose(guided, plain, atol=1e-4), kind
    strong = model.generate(labels, seeds=[7, 8], flow_steps=3, guidance=Guidance("xz_cfg", w_x=1.5, w_z=3.0))
    assert not torch.allclose(strong, plain, atol=1e-3)
    assert Guidance("cfg", cfg=3.0, ramp=True).at_step(0, 4).cfg == 1.5
    assert Guidance("cfg", cfg=3.0, ramp=True).at_step(3, 4).cfg == 3.0


@pytest.mark.parametrize("head", ["flow", "ddpm"])
def test_per_sample_seeds_independent_of_batch(head):
    model = tiny("next-scale", head=head)
    guidance = Guidance("cfg", cfg=2.0)
    batch = model.generate(torch.tensor([3, 1, 4]), seeds=[10, 11, 12], flow_steps=3, guidance=guidance)
    alone = model.generate(torch.tensor([1]), seeds=torch.tensor([11]), flow_steps=3, guidance=guidance)
    # An untrained DDPM head's samples reach ~1e4, where batch size changes the float rounding of the
    # matmuls: equal up to a millionth of the set's scale (another seed differs by its whole scale).
    scale = alone.abs().max()
    assert torch.allclose(batch[1:2], alone, rtol=1e-4, atol=1e-6 * scale + 1e-5)
    assert not torch.allclose(batch[0], batch[2], atol=1e-3)


def test_head_sampling_modes():
    model = tiny("next-row")
    x, labels = data(model)
    with torch.no_grad():
        z = model(x, labels)
        noise = [gaussian_noise(x.shape, [torch.Generator().manual_seed(s) for s in (1, 2)], "cpu") for _ in range(2)]
        a, b = (model.head.sample(z, n, 4) for n in noise)
        assert a.shape == x.shape and torch.equal(a, b)
        e = torch.randn_like(x)
        one = model.head.sample(z, e, 1, mode="one_step")
        v = model.head(e.flatten(0, 1), model.head.condition(torch.zeros(e.shape[0] * e.shape[1]), z.flatten(0, 1)))
        assert torch.allclose(one, e + v.view_as(e), atol=1e-5)
        assert not torch.allclose(model.head.sample(z, e, 2, Guidance("x_cfg", w_x=2.0)),
                                  model.head.sample(z, e, 2), atol=1e-4)


def test_time_schedules():
    for schedule in ["uniform", "shifted"]:
        t = tiny("next-row", time_schedule=schedule).head.time_grid(8, "cpu")
        assert t[0] == 0 and abs(t[-1] - 1) < 1e-6 and (t.diff() > 0).all()
    shifted = tiny("next-row", time_schedule="shifted").head.time_grid(8, "cpu")
    assert shifted[1] < 1 / 8                                         # finer steps near the noise


def test_training_step_dropout_checkpointing_bf16():
    model = tiny("next-neighbour").train()
    x, labels = data(model)
    drop = torch.tensor([True, False])
    z = model(x, labels, drop_labels=drop)
    null = torch.tensor([CLASSES, labels[1]])
    assert torch.allclose(z, model(x, null, drop_labels=torch.zeros(2, dtype=torch.bool)), atol=1e-6)
    loss = model.head.loss(z, x)
    assert loss.shape == (2, 16)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    grads = [p.grad.clone() for p in model.backbone.parameters()]
    ckpt = tiny("next-neighbour", grad_checkpointing=True).train()
    model.zero_grad()
    for m in (model, ckpt):
        torch.manual_seed(5)
        m.head.loss(m(x, labels, drop_labels=drop), x).mean().backward()
    for p, q in zip(model.backbone.parameters(), ckpt.backbone.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    assert len(grads) == len(list(ckpt.backbone.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.head.loss(model(x, labels), x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()


GRID_MODES = torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]])


def train_on_mixture(head, **overrides):
    """A head alone (z fixed at 0) trained 300 steps on a 4-mode 2-D mixture (std 0.1), in eval()."""
    torch.manual_seed(0)
    model = build_model("tiny", token_dim=2, height=1, width=1, grouping="next-token", num_classes=1,
                        head_width=96, head_depth=2, head_batch_mul=1, z_dropout=0.0, head=head, **overrides)
    opt = torch.optim.Adam(model.head.parameters(), lr=3e-3)
    z = torch.zeros(256, 1, model.config.hidden_size)
    for _ in range(300):
        x = GRID_MODES[torch.randint(4, (256,))] + 0.1 * torch.randn(256, 2)
        loss = model.head.loss(z, x[:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def assert_covers_modes(samples, max_share):
    """Over 75% of the samples within 0.5 of a mode, every mode holding 15%..max_share of those."""
    dist = torch.cdist(samples, GRID_MODES)
    near = dist.min(1).values < 0.5
    assert near.float().mean() > 0.75
    share = torch.bincount(dist.argmin(1)[near], minlength=4).float() / near.sum()
    assert share.min() > 0.15 and share.max() < max_share


def test_flow_head_learns_gaussian_mixture():
    """The head alone (z fixed at 0) fits a 4-mode 2-D mixture: samples land near modes, balanced."""
    model = train_on_mixture("flow")
    with torch.no_grad():
        noise = torch.randn(1000, 1, 2, generator=torch.Generator().manual_seed(0))
        samples = model.head.sample(torch.zeros(1000, 1, 64), noise, 20)[:, 0]
    assert_covers_modes(samples, 0.35)


def test_flow_head_x_prediction_learns_gaussian_mixture():
    """head_prediction='x': the network outputs the clean token, the loss and the sampler see the
    velocity (x_hat - x_t) / (1 - t); it fits the mixture as v-prediction does."""
    model = train_on_mixture("flow", head_prediction="x", train_time="logit_normal")
    with torch.no_grad():
        noise = torch.randn(1000, 1, 2, generator=torch.Generator().manual_seed(0))
        samples = model.head.sample(torch.zeros(1000, 1, 64), noise, 10, solver="heun")[:, 0]
    assert_covers_modes(samples, 0.35)


def test_x_prediction_velocity_and_guidance():
    """The velocity is (out - x_t) / max(1 - t, eps); guiding x_hat equals guiding the velocities."""
    head = FlowHead(preset_config("tiny", token_dim=3, height=1, width=1, grouping="next-token", head_prediction="x"))
    out, x_t = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0.0, 0.5, 0.9, 0.96, 1.0])
    expected = (out - x_t) / torch.tensor([1.0, 0.5, 0.1, 0.05, 0.05])[:, None]
    assert torch.allclose(head.velocity(out, x_t, t), expected, atol=1e-5)
    a, b, w, t0 = torch.randn(5, 3), torch.randn(5, 3), 1.7, torch.tensor(0.3)
    assert torch.allclose(head.velocity(head.guide(a, b, w), x_t, t0),
                          head.guide(head.velocity(a, x_t, t0), head.velocity(b, x_t, t0), w), atol=1e-5)
    with pytest.raises(ValueError, match="head_prediction"):
        preset_config("tiny", head_prediction="eps")


class ConstantCleanToken(FlowHead):
    """An x-prediction head whose network says every token is `clean`, whatever x_t and t."""

    clean = torch.tensor([0.5, -1.0, 2.0])

    def forward(self, x, c):
        return self.clean.expand_as(x)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_x_prediction_sampler_lands_on_the_clean_estimate(solver):
    """Under x-prediction the step that ends at t = 1 is Euler, so a head sure of x_hat returns x_hat
    exactly; a Heun correction there (velocity clipped at 1 - t = x_pred_eps) would land half-way back
    toward the last noisy x_t. Heun then costs 2 x steps - 1 head calls."""
    head = ConstantCleanToken(preset_config("tiny", token_dim=3, height=1, width=1, grouping="next-token",
                                            head_prediction="x"))
    noise = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = head.sample(torch.zeros(4, 2, 64), noise, 13, solver=solver)
    assert torch.allclose(out, ConstantCleanToken.clean.expand_as(out), atol=1e-5)
    assert head.nfe(13, solver) == (25 if solver == "heun" else 13)
    assert FlowHead(preset_config("tiny", token_dim=3, height=1, width=1, grouping="next-token")).nfe(13, "heun") == 26


@pytest.mark.parametrize("preset,target", [("sar-b", 141e6), ("sar-l", 714e6), ("sar-h", 1.3e9)])
def test_preset_parameter_counts(preset, target):
    with torch.device("meta"):
        model = build_model(preset)
    assert abs(count_parameters(model) / target - 1) < 0.05
    assert model.config.height == 16 and model.config.token_dim == 16


def test_build_model_rejects_unknown():
    assert set(PRESETS) >= {"tiny", "small", "sar-b", "sar-l", "sar-h"}
    with pytest.raises(ValueError):
        build_model("tiny", not_a_field=1)
    with pytest.raises(ValueError):
        Guidance("bogus")
    assert SARConfig().grouping == "next-neighbour" and make_grouping("next-row", 2, 2).num_groups == 2


def test_config_round_trips_and_reads_older_names():
    config = build_model("tiny", grouping="next-scale", height=4, width=4, scales=[1, 2, 4]).config
    d = config.to_dict()
    assert d["scales"] == [1, 2, 4] and SARConfig.from_dict(d) == config  # lists back to tuples
    # A checkpoint's meta.json from before the backbone width was renamed still builds its model.
    old = {k: v for k, v in d.items() if k != "hidden_size"} | {"width_dim": 48}
    assert SARConfig.from_dict(old).hidden_size == 48
    with pytest.raises(ValueError, match="unknown model field 'head_dpeth'"):
        SARConfig.from_dict({**d, "head_dpeth": 7})


@pytest.mark.ray  # FlexAttention compiles on CPU: a C++ compiler process
def test_flex_equals_sdpa_cpu():
    """FlexAttention (compiled on CPU, inference only there) agrees with masked SDPA."""
    sdpa, flex = tiny("next-neighbour", attention="sdpa"), tiny("next-neighbour", attention="flex")
    x, labels = data(sdpa)
    with torch.no_grad():
        assert torch.allclose(flex(x, labels), sdpa(x, labels), atol=1e-4)


# ---- ODE solvers, temperature, compiled steps ------------------------------------------------
MODES = torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-1.0, -3.0]])
MODE_STD = 0.3


class MixtureVelocity(FlowHead):
    """The exact rectified-flow velocity E[x - e | x_t] of an equal-weight 2-D Gaussian mixture."""

    def evaluate(self, x, t, cz, kind, w):
        var = t ** 2 * MODE_STD ** 2 + (1 - t) ** 2                   # Var(x_t | mode k), per axis
        d = x[:, None] - t * MODES[None]                               # (N, K, 2)
        weight = torch.softmax(-d.pow(2).sum(-1) / (2 * var), -1)      # p(k | x_t)
        v = MODES[None] + (t * MODE_STD ** 2 - (1 - t)) / var * d      # E[x - e | x_t, k]
        return (weight[..., None] * v).sum(1)


def test_heun_beats_euler_at_equal_evaluations():
    """On an exact mixture field, Heun with n steps lands closer to a 200-step Euler reference
    than Euler with 2n steps (the same evaluations), and its error falls ~4x per halving of dt."""
    head = MixtureVelocity(preset_config("tiny", token_dim=2, height=1, width=1, grouping="next-token"))
    noise = torch.randn(2000, 1, 2, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(2000, 1, head.cond_embed.in_features)
    reference = head.sample(z, noise, 200)

    def error(steps, solver):
        return (head.sample(z, noise, steps, solver=solver) - reference).norm(dim=-1).mean().item()

    heun, euler = {n: error(n, "heun") for n in (4, 8)}, {n: error(2 * n, "euler") for n in (4, 8)}
    for n in (4, 8):
        assert heun[n] < 0.5 * euler[n], (n, heun[n], euler[n])
        assert error(n, "midpoint") < 0.5 * euler[n]
    assert heun[4] / heun[8] > 2.8 and euler[4] / euler[8] < 2.5      # second vs first order
    assert head.nfe(4, "heun") == head.nfe(8, "euler") == 8


@pytest.mark.parametrize("head", ["flow", "ddpm"])
def test_one_head_call_per_evaluation_for_every_guidance(head):
    """Every guidance kind batches its branches: head calls == nfe(steps, solver), each call
    on head_calls x N rows."""
    model = tiny("next-row", head=head)
    calls = []
    model.head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    N, steps = 8, 3
    for kind in GUIDANCE_KINDS:
        guidance = Guidance(kind, cfg=2.0, w_x=1.5, w_z=2.0)
        z = torch.randn(2 if guidance.needs_uncond_backbone else 1, N, model.config.hidden_size)
        noise = torch.randn(1, N, model.config.token_dim)
        for solver in (SOLVERS if head == "flow" else ["euler"]):
            for mode in ("ode", "one_step"):
                calls.clear()
                out = model.head.sample(z, noise, steps, guidance, mode, solver=solver)
                assert out.shape == noise.shape
                assert len(calls) == model.head.nfe(steps, solver, mode), (kind, solver, mode)
                assert set(calls) == {guidance.head_calls * N}
    assert model.head.nfe(steps, "heun" if head == "flow" else "euler") == (6 if head == "flow" else 3)


def test_temperature_scales_the_initial_noise():
    model = tiny("next-neighbour")
    labels = torch.tensor([2, 5])
    cold = [model.generate(labels, seeds=s, flow_steps=3, temperature=0.0) for s in ([1, 2], [3, 4])]
    warm = [model.generate(labels, seeds=s, flow_steps=3) for s in ([1, 2], [3, 4])]
    assert torch.equal(cold[0], cold[1]) and not torch.allclose(warm[0], warm[1], atol=1e-3)
    assert torch.equal(model.generate(labels, seeds=[1, 2], flow_steps=3, temperature=1.0), warm[0])
    x, _ = data(model)
    with torch.no_grad():
        z, e = model(x, labels), torch.randn_like(x)
        assert torch.allclose(model.head.sample(z, e, 3, temperature=0.5), model.head.sample(z, 0.5 * e, 3))


def test_compile_head_is_a_no_op_on_cpu(monkeypatch):
    """On CPU the head's steps run eagerly with compile_head: the same samples, bit for bit, and
    torch.compile is never called."""
    model = tiny("next-neighbour")
    labels, guidance = torch.tensor([2, 5]), Guidance("xz_cfg", w_x=1.5, w_z=2.0)
    plain = model.generate(labels, seeds=[1, 2], flow_steps=3, guidance=guidance, solver="heun")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called on CPU")
    monkeypatch.setattr(torch, "compile", refuse)
    assert torch.equal(model.generate(labels, seeds=[1, 2], flow_steps=3, guidance=guidance, solver="heun",
                                      compile_head=True), plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile_head compiles (CUDA graphs) only on CUDA")
@pytest.mark.parametrize("head,solver", [("flow", "euler"), ("flow", "heun"), ("ddpm", "euler")])
def test_compile_head_same_samples_on_cuda(head, solver):
    model = tiny("next-neighbour", head=head).cuda()
    labels, guidance = torch.tensor([2, 5], device="cuda"), Guidance("xz_cfg", w_x=1.5, w_z=2.0, ramp=True)
    kwargs = dict(seeds=[1, 2], flow_steps=4, guidance=guidance, solver=solver)
    eager = model.generate(labels, **kwargs)
    tol = 1e-4 * eager.abs().max().clamp(min=1)                     # an untrained DDPM head reaches ~1e4
    for _ in range(2):                                              # recorded, then replayed
        diff = (model.generate(labels, compile_head=True, **kwargs) - eager).abs().max()
        assert diff <= tol, (diff, tol)


def test_unknown_solver_rejected():
    model = tiny("next-row")
    with pytest.raises(ValueError, match="unknown solver"):
        model.generate(torch.tensor([1]), seeds=[0], flow_steps=2, solver="rk4")
    with pytest.raises(ValueError, match="samples ancestrally"):
        tiny("next-row", head="ddpm").generate(torch.tensor([1]), seeds=[0], flow_steps=2, solver="heun")


# ---- DDPM head -------------------------------------------------------------------------------
def test_ddpm_schedule_and_respacing():
    schedule = NoiseSchedule.cosine()
    assert len(schedule.betas) == DIFFUSION_STEPS and schedule.betas.max() == 0.999
    assert (schedule.alphas_cumprod.diff() < 0).all()
    full = schedule.respaced(DIFFUSION_STEPS)                         # every step: the same chain
    assert torch.allclose(full.betas, schedule.betas, rtol=1e-9) and full.timesteps == schedule.timesteps
    fifty = schedule.respaced(50)
    assert len(fifty.timesteps) == 50 and fifty.timesteps[0] == 0 and fifty.timesteps[-1] == DIFFUSION_STEPS - 1
    assert torch.allclose(torch.cumprod(1 - fifty.betas, 0), schedule.alphas_cumprod[fifty.timesteps])


def test_ddpm_head_shapes_loss_and_guidance():
    flow, ddpm = tiny("next-neighbour"), tiny("next-neighbour", head="ddpm")
    assert flow.state_dict().keys() == ddpm.state_dict().keys()       # the same MLP
    assert ddpm.head.final.linear.out_features == 2 * ddpm.config.token_dim  # epsilon and variance
    x, labels = data(ddpm)
    loss = ddpm.train().head.loss(ddpm(x, labels), x)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in ddpm.head.parameters())
    ddpm.eval()
    assert ddpm.generate(labels, seeds=[7, 8], flow_steps=3).shape == x.shape
    with torch.no_grad():                                           # guidance on epsilon, fixed z
        z, e = ddpm(x, labels), torch.randn_like(x)
        plain = ddpm.head.sample(z, e, 3, step_noise=lambda: torch.ones_like(e))
        tol = 1e-4 * plain.abs().max()                              # untrained: ~1e4 (from t = 999)
        for kind in ["cfg", "z_cfg", "x_cfg", "xz_cfg"]:
            uncond = torch.cat([z, torch.randn_like(z)]) if Guidance(kind).needs_uncond_backbone else z
            guided = ddpm.head.sample(uncond, e, 3, Guidance(kind), step_noise=lambda: torch.ones_like(e))
            assert torch.allclose(guided, plain, atol=tol), kind
        strong = ddpm.head.sample(z, e, 3, Guidance("x_cfg", w_x=3.0), step_noise=lambda: torch.ones_like(e))
        assert not torch.allclose(strong, plain, atol=100 * tol)
    with torch.no_grad():                                           # one_step: x_0 at t = 999
        one = ddpm.head.sample(z, e, 1, mode="one_step")
        c = ddpm.head.condition(torch.full((32,), 0.999), z.flatten(0, 1))
        eps = ddpm.head(e.flatten(0, 1), c)[:, :x.shape[-1]].view_as(x)
        abar = ddpm.head.schedule.alphas_cumprod[-1]
        assert torch.allclose(one, (e - (1 - abar).sqrt() * eps) / abar.sqrt(), rtol=1e-3, atol=1e-2)


def test_ddpm_temperature_scales_the_step_noise():
    """MAR's temperature scales each ancestral step's noise: at 0 only the initial noise matters."""
    model = tiny("next-row", head="ddpm")
    x, labels = data(model)
    with torch.no_grad():
        z, e = model(x, labels), torch.randn_like(x)
        draws = [lambda g=torch.Generator().manual_seed(s): torch.randn(x.shape, generator=g) for s in (1, 2)]
        cold = [model.head.sample(z, e, 4, temperature=0.0, step_noise=d) for d in draws]
        warm = [model.head.sample(z, e, 4, step_noise=d) for d in draws]
    assert torch.equal(cold[0], cold[1]) and not torch.allclose(warm[0], warm[1], atol=1e-4)


def test_ddpm_head_learns_gaussian_mixture():
    """The DDPM head fits the flow head's mixture; sampled with the whole 1000-step chain, since a
    respaced chain's first step (t = 999) multiplies the epsilon error by sqrt(1 / abar_999 - 1)
    x coef1, ~2e4 sqrt(abar at the next step) (ddpm_head.py)."""
    model = train_on_mixture("ddpm")
    with torch.no_grad():
        noise = torch.randn(1000, 1, 2, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        samples = model.head.sample(torch.zeros(1000, 1, 64), noise, DIFFUSION_STEPS,
                                    step_noise=lambda: torch.randn(1000, 1, 2, generator=g))[:, 0]
    assert_covers_modes(samples, 0.4)
