"""Plain-function tests of the shared training loop and the two objectives (no Ray)."""

import copy

import pytest
import torch

from jobs.config import load_config
from models import build_model
from pipelines.core.errors import SarError
from pipelines.core.rundir import bind_run_dir, config_fingerprint
from pipelines.data.latents import tokens_from_batch
from pipelines.train.objectives import PretrainObjective, RefineObjective, group_buckets
from pipelines.train.optim import make_ema, make_optimizer, make_scheduler
from tests.conftest import DEMO_CONFIG


def tiny(grouping="next-neighbour", **kw):
    torch.manual_seed(0)
    return build_model("tiny", token_dim=6, height=4, width=4, num_classes=3, grouping=grouping, **kw)


def refine_cfg(**overrides):
    return load_config(DEMO_CONFIG, [f"refine.{k}={v}" for k, v in overrides.items()]).refine


def batch(n=4, seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_tokens_from_batch_flips_and_samples_the_posterior():
    g = make_grouping_for_grid()
    mean = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).view(2, 4, 4, 3)
    rows = {"mean": mean, "mean_flip": mean.flip(2), "label": torch.tensor([1, 2])}
    flips = set()
    for seed in range(12):
        x, labels = tokens_from_batch(rows, g, torch.Generator().manual_seed(seed), torch.device("cpu"))
        grid = g.to_grid(x)
        for i in range(2):
            assert torch.equal(grid[i], mean[i]) or torch.equal(grid[i], mean[i].flip(1))
            flips.add(torch.equal(grid[i], mean[i]))
        assert labels.tolist() == [1, 2]
    assert flips == {True, False}  # both the image and its flip are drawn
    rows = {**rows, "mean_flip": mean, "logvar": torch.full_like(mean, -2.0), "logvar_flip": torch.full_like(mean, -2.0)}
    xs = torch.stack([tokens_from_batch(rows, g, torch.Generator().manual_seed(s), torch.device("cpu"))[0]
                      for s in range(200)])
    spread = (xs - xs.mean(0)).std()
    assert 0.3 < spread < 0.45  # exp(0.5 * -2) = 0.37: samples, not the mean


def make_grouping_for_grid():
    from models import make_grouping

    return make_grouping("next-neighbour", 4, 4)


def test_scheduler_warms_up_then_holds():
    cfg = load_config(None, ["pretrain.steps=20", "pretrain.optim.warmup_steps=4", "pretrain.optim.lr=0.1"]).pretrain
    model = tiny()
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.025) and lrs[3] == pytest.approx(0.08125) and lrs[4] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.1)
    assert lrs == sorted(lrs)
    # Norms and biases are not decayed.
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])


def test_ema_tracks_the_model_bias_corrected():
    """After n updates the EMA is sum_k (1 - d) d^(n-k) w_k / (1 - d^n): the first weights weigh what
    any step of their age does, not the d^n a copy-then-decay average leaves them."""
    model = tiny()
    ema, d = make_ema(model, 0.5), 0.5
    p0 = next(iter(model.parameters())).detach().clone()
    for _ in range(3):  # the weights w_1 = p0, w_2 = p0 + 1, w_3 = p0 + 2
        ema.update_parameters(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    weights = [(1 - d) * d ** (3 - k) for k in (1, 2, 3)]
    expected = p0 + sum(w * (k - 1) for w, k in zip(weights, (1, 2, 3))) / sum(weights)
    assert torch.allclose(next(iter(ema.module.parameters())), expected, atol=1e-6)
    assert not torch.allclose(expected, p0 + (d * d * 0 + d * (1 - d) * 1 + (1 - d) * 2))  # the plain EMA's value


def test_group_buckets_partition_the_groups():
    g = make_grouping_for_grid()
    b = group_buckets(g.group_index, g.num_groups)
    total = sum(m.long() for m in b.values())
    assert torch.equal(total, torch.ones_like(total))
    assert b["early"][0] and b["late"][-1]


def test_run_dir_refuses_another_config(tmp_path):
    def bind(*overrides):
        cfg = load_config(DEMO_CONFIG, [f"run_dir={tmp_path}", *overrides])
        bind_run_dir(f"{tmp_path}/pretrain", config_fingerprint(cfg.public_dict(), "pretrain"), "pretrain",
                     cfg.pretrain.allow_config_change)

    bind()
    bind()  # same config: fine
    bind("pretrain.steps=999")  # a longer budget resumes
    with pytest.raises(SarError, match=r"pretrain.optim.lr: run has 0.002, config has 0.5"):
        bind("pretrain.optim.lr=0.5")
    bind("pretrain.optim.lr=0.5", "pretrain.allow_config_change=true")


def test_a_setting_added_by_a_later_release_counts_as_its_default(tmp_path):
    """A binding written before a setting existed lacks it: its default is what that run did."""
    from pipelines.core.rundir import first_difference

    from pipelines.train.driver import fingerprints

    cfg = load_config(DEMO_CONFIG, ["refine.loss_reduction=sum"])
    ours, defaults = fingerprints(cfg, "refine")
    old = copy.deepcopy(ours)
    del old["refine"]["loss_reduction"]  # today's default is what the run did: mean
    assert first_difference(old, ours, defaults=defaults) == 'refine.loss_reduction: run has "mean", config has "sum"'
    assert first_difference(old, fingerprints(load_config(DEMO_CONFIG), "refine")[0], defaults=defaults) is None
    # A default changed since the setting was added: a binding without it ran what the setting replaced.
    del old["refine"]["rollout_groups"]
    assert cfg.refine.rollout_groups == "second-to-last"
    assert first_difference(old, fingerprints(load_config(DEMO_CONFIG), "refine")[0], defaults=defaults) == \
        'refine.rollout_groups: run has "all", config has "second-to-last"'
    all_groups = fingerprints(load_config(DEMO_CONFIG, ["refine.rollout_groups=all"]), "refine")[0]
    assert first_difference(old, all_groups, defaults=defaults) is None


# Refinement ------------------------------------------------------------------------------------
def refine_step(head="flow", **settings):
    """One refine step of a tiny model: (objective, whether each backbone forward carried a gradient, loss, batch)."""
    model = tiny(head=head)
    obj = RefineObjective(model, refine_cfg(sample_steps=3, **settings))
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(o.requires_grad))
    x, y = batch()
    loss, _, _ = obj(x, y, torch.Generator().manual_seed(0))
    loss.backward()
    return obj, calls, loss, (x, y)


ROLLOUTS = ["all", "second-to-last", "random-one"]


@pytest.mark.parametrize("rollout", ROLLOUTS)
@pytest.mark.parametrize("mode, forwards", [("deterministic", 2), ("stochastic", 2), ("x_cfg", 2), ("cfg", 3),
                                            ("cfg_ramped", 3)])
def test_refine_step_is_one_extra_backbone_pass(mode, forwards, rollout):
    """Pass 1 and pass 2, plus the unconditional pass of real CFG in the sample step (no gradient)."""
    _, calls, _, _ = refine_step(sample_mode=mode, rollout_groups=rollout)
    assert len(calls) == forwards and sum(calls) == 2  # exactly two passes carry a gradient


def test_cfg_sample_step_guides_with_the_unconditional_pass():
    """Real CFG at scale 1 is the conditional ODE (stochastic mode); at 2.5 it moves the predictions."""
    model = tiny().eval()
    with torch.no_grad():  # the head starts at v = 0 (zero-initialised output): give it something to guide
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = batch()
    with torch.no_grad():
        z = model(x, y)
    def rollout(**settings):
        obj = RefineObjective(model, refine_cfg(sample_steps=3, **settings))
        return obj.rollout_tokens(x, y, z, torch.Generator().manual_seed(3))
    plain = rollout(sample_mode="stochastic")
    torch.testing.assert_close(rollout(sample_mode="cfg", cfg_scale=1.0), plain, atol=1e-5, rtol=0)
    assert not torch.allclose(rollout(sample_mode="cfg", cfg_scale=2.5), plain, atol=1e-3)
    assert not torch.allclose(rollout(sample_mode="x_cfg", x_cfg_scale=2.0), plain, atol=1e-3)


@pytest.mark.parametrize("rollout", ROLLOUTS)
def test_refine_loss_is_tf_plus_gamma_csf_and_teacher_targets_have_no_grad(rollout):
    model = tiny()
    obj = RefineObjective(model, refine_cfg(gamma=0.37, sample_mode="deterministic", rollout_groups=rollout)).eval()
    x, y = batch()
    targets = []
    orig = model.head.loss

    def spy(z, target):
        targets.append(target)
        return orig(z, target)

    model.head.loss = spy
    torch.manual_seed(1)
    loss, _, m = obj(x, y, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(m["loss_tf"].item() + 0.37 * m["loss_csf"].item(), rel=1e-6)
    # CSFL's target is the detached teacher prediction, not the ground truth (the one-group rollouts:
    # group k + 1's tokens alone).
    assert not targets[1].requires_grad and targets[1].grad_fn is None
    k = obj.rollout_group(torch.Generator().manual_seed(0))
    truth = x if k is None else x[:, model.grouping.group_index == k + 1]
    assert targets[1].shape == truth.shape and not torch.allclose(targets[1], truth)


def held(fixed):
    """A sample step that returns `fixed` (n, L, D) at the positions asked for."""
    return lambda x, y, z, gen, positions=None: fixed if positions is None else fixed[:, positions]


def test_pass_two_sees_ground_truth_only_through_predictions():
    model = tiny().eval()
    obj = RefineObjective(model, refine_cfg(sample_mode="deterministic", rollout_groups="all")).eval()
    fixed = torch.randn(4, 16, 6)
    obj.rollout_tokens = held(fixed)  # the predictions, held fixed
    outputs = []
    model.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach().clone()))
    x1, y = batch(seed=1)
    x2, _ = batch(seed=2)
    obj(x1, y)
    obj(x2, y)
    z_teacher_1, z_student_1, z_teacher_2, z_student_2 = outputs
    assert not torch.allclose(z_teacher_1, z_teacher_2)  # pass 1 reads the ground truth
    assert torch.equal(z_student_1, z_student_2)  # pass 2 does not


@pytest.mark.parametrize("grouping", ["next-row", "next-scale"])
def test_refine_runs_for_shift_aligned_groupings(grouping):
    model = tiny(grouping=grouping, **({"scales": (1, 2, 4)} if grouping == "next-scale" else {}))
    obj = RefineObjective(model, refine_cfg(sample_mode="stochastic", sample_steps=2))
    x = torch.randn(2, model.grouping.seq_len, 6)
    loss, _, m = obj(x, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and m["loss_csf"] > 0


@pytest.mark.parametrize("rollout", ROLLOUTS)
def test_gamma_zero_gives_the_pretraining_update(rollout):
    x, y = batch()
    updated = []
    for make in (lambda m: PretrainObjective(m),
                 lambda m: RefineObjective(m, refine_cfg(gamma=0.0, rollout_groups=rollout))):
        model = tiny()
        obj = make(model).train()
        cfg = load_config(None, ["pretrain.optim.warmup_steps=0"]).pretrain
        opt = make_optimizer(obj, cfg)
        torch.manual_seed(123)
        loss, _, _ = obj(x, y, torch.Generator().manual_seed(5))
        loss.backward()
        opt.step()
        updated.append(copy.deepcopy(model.state_dict()))
    for k in updated[0]:
        torch.testing.assert_close(updated[0][k], updated[1][k], rtol=0, atol=1e-7, msg=k)


def test_csf_on_one_group_only():
    model = tiny()
    obj = RefineObjective(model, refine_cfg(group=3, rollout_groups="all"))
    assert obj.csf_mask.sum() == (model.grouping.group_index == 3).sum()
    with pytest.raises(SarError, match="refine.group"):
        RefineObjective(model, refine_cfg(group=99, rollout_groups="all"))
    with pytest.raises(SarError, match="goes with rollout_groups all"):
        RefineObjective(model, refine_cfg(group=3, rollout_groups="random-one"))


def csf_of_one_step(obj, x, y, seed=0):
    """(loss_csf, the per-token CSF losses (n, L) of the step) of one refine step."""
    head, seen = obj.model.head, []
    orig = head.loss
    head.loss = lambda z, target: seen.append(orig(z, target)) or seen[-1]
    _, _, m = obj(x, y, torch.Generator().manual_seed(seed))
    head.loss = orig
    return m["loss_csf"], seen[1].detach()


@pytest.mark.parametrize("rollout, group", [("second-to-last", "last"), ("random-one", "drawn")])
def test_one_group_rollout_feeds_its_predictions_to_the_next_group_alone(rollout, group):
    """The student's group k + 1 sees group k only through the teacher's predictions and the groups
    before k as they are; CSFL is group k + 1's loss alone. k is the second-to-last group, or drawn
    per step from the step's generator (the same draw for the same seed)."""
    model = tiny().eval()
    obj = RefineObjective(model, refine_cfg(sample_mode="deterministic", rollout_groups=rollout)).eval()
    g, T = model.grouping, model.grouping.num_groups
    k = obj.rollout_group(torch.Generator().manual_seed(0))
    assert k == obj.rollout_group(torch.Generator().manual_seed(0)) and 0 <= k <= T - 2
    if group == "last":
        assert k == T - 2
    else:
        assert len({obj.rollout_group(torch.Generator().manual_seed(s)) for s in range(40)}) > 3
    fixed = torch.randn(4, 16, 6)
    obj.rollout_tokens = held(fixed)  # the predictions, held fixed
    outputs = []
    model.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach().clone()))
    x, y = batch(seed=1)
    changed_k, changed_before = x.clone(), x.clone()
    changed_k[:, g.group_index == k] += 1.0
    changed_before[:, g.group_index < k] += 1.0
    nxt = g.group_index == k + 1
    for variant in (x, changed_k, changed_before):
        torch.manual_seed(0)
        obj(variant, y, torch.Generator().manual_seed(0))
    student = outputs[1::2]  # each step: pass 1, pass 2
    assert torch.equal(student[0][:, nxt], student[1][:, nxt])  # group k's ground truth is not read
    if k > 0:
        assert not torch.allclose(student[0][:, nxt], student[2][:, nxt])  # the groups before k are
    loss_csf, per_token = csf_of_one_step(obj, x, y)  # the head's loss is taken on group k + 1 alone
    assert per_token.shape == (4, int(nxt.sum())) and loss_csf.item() == pytest.approx(per_token.mean().item(), rel=1e-6)


def test_csf_sums_the_groups_means_or_averages_the_tokens():
    """loss_reduction sum is eq. 10's sum over groups 2..T of each group's mean; mean averages the tokens."""
    x, y = batch()
    for reduction in ("mean", "sum"):
        model = tiny().eval()
        obj = RefineObjective(model, refine_cfg(sample_mode="deterministic", loss_reduction=reduction,
                                                rollout_groups="all")).eval()
        torch.manual_seed(0)
        loss_csf, per_token = csf_of_one_step(obj, x, y)
        gi = model.grouping.group_index
        expected = (per_token[:, gi >= 1].mean() if reduction == "mean"
                    else sum(per_token[:, gi == t].mean() for t in range(1, model.grouping.num_groups)))
        assert loss_csf.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.grouping.num_groups > 2  # so the two reductions differ


def test_ramped_cfg_weights_grow_over_the_groups_as_the_released_code():
    """w_g = 1 + s / 2 (1 + g / (T - 1)): (1 + t) c - t u with t from s/2 at the first group to s at the last."""
    model = tiny()
    obj = RefineObjective(model, refine_cfg(sample_mode="cfg_ramped", cfg_scale=2.5))
    w = obj.sample_weights(2)
    gi, T = model.grouping.group_index, model.grouping.num_groups
    assert w.shape == (2, 16) and torch.allclose(w[0], 1 + 1.25 * (1 + gi.float() / (T - 1)))
    assert w[0, gi == 0].unique().item() == pytest.approx(2.25) and w[0, gi == T - 1].unique().item() == pytest.approx(3.5)
    with torch.no_grad():  # a head with an output, so guidance moves it
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = batch()
    with torch.no_grad():
        z = model(x, y)
        ramped = obj.rollout_tokens(x, y, z, torch.Generator().manual_seed(3))
        flat = RefineObjective(model, refine_cfg(sample_mode="cfg", cfg_scale=2.25)).rollout_tokens(
            x, y, z, torch.Generator().manual_seed(3))
    first = gi == 0
    torch.testing.assert_close(ramped[:, first], flat[:, first], atol=1e-5, rtol=0)  # same weight on group 1
    assert not torch.allclose(ramped[:, ~first], flat[:, ~first], atol=1e-3)


def test_linear_lr_scaling_and_an_ema_of_decay_zero():
    """lr_scaling linear-256 multiplies the base lr by global_batch / 256; ema_decay 0 keeps no average."""
    from pipelines.train.optim import learning_rate

    cfg = load_config(None, ["refine.optim.lr_scaling=linear-256", "refine.global_batch=2048"]).refine
    assert learning_rate(cfg) == pytest.approx(8e-4)  # the released code: 1e-4 at 256 is 8e-4 at 2048
    assert make_optimizer(tiny(), cfg).param_groups[0]["lr"] == pytest.approx(8e-4)
    assert learning_rate(load_config(None).refine) == pytest.approx(1e-4)
    model = tiny()
    ema = make_ema(model, 0.0)
    ema.update_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), model.parameters()))


def test_in_training_evaluations_reach_the_stage_run(tmp_path):
    """An evaluation's row goes to the tracker under eval/, each step once (a resume re-sends them), with its grid."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from pipelines.core import tracking
    from pipelines.train.worker import track_evaluation

    stage_dir = tmp_path / "pretrain"
    (stage_dir / "evals").mkdir(parents=True)
    for step in (10, 20):
        (stage_dir / "evals" / f"step_{step:08d}.png").write_bytes(b"png of step %d" % step)
    rows = [{"step": s, "fid": f, "accuracy": a, "evaluator": "domain", "grid": f"evals/step_{s:08d}.png"}
            for s, f, a in ((10, 50.0, 0.25), (20, 40.0, 0.5))]
    loop = SimpleNamespace(stage_dir=str(stage_dir), storage_options={})
    with tracking.open_run(str(tmp_path)) as tr, tr.stage("pretrain", str(stage_dir)) as st:
        for row in rows + rows:  # the second pass: what a resumed loop re-sends
            track_evaluation(st, loop, row)
    client = MlflowClient(tracking.default_uri(str(tmp_path)))
    history = sorted((m.step, m.value) for m in client.get_metric_history(st.run_id, "eval/fid"))
    assert history == [(10, 50.0), (20, 40.0)]  # each step once
    assert "eval/accuracy" in client.get_run(st.run_id).data.metrics
    assert sorted(a.path for a in client.list_artifacts(st.run_id, "evals")) == [
        "evals/step_00000010.png", "evals/step_00000020.png"]


@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
def test_exposure_gap_only_when_logged(mode):
    """The gap metrics come only with log_metrics; the loss does not depend on them, and the
    deterministic gap (which reuses the sample step's estimate) equals one computed afresh."""
    model = tiny()
    obj = RefineObjective(model, refine_cfg(sample_mode=mode, sample_steps=2)).eval()
    x, y = batch()
    torch.manual_seed(1)
    loss, _, logged = obj(x, y, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    quiet_loss, _, quiet = obj(x, y, torch.Generator().manual_seed(0), log_metrics=False)
    assert {"gap_early", "gap_middle", "gap_late"} <= set(logged) and not any(k.startswith("gap") for k in quiet)
    assert torch.equal(loss, quiet_loss)
    if mode == "deterministic":
        with torch.no_grad():
            x_t = model.head.sample(model(x, y), torch.zeros_like(x), 1, mode="one_step")
            x_s = model.head.sample(model(x_t, y), torch.zeros_like(x), 1, mode="one_step")
            gap = (x_s - x_t).pow(2).mean(-1)
        assert logged["gap_late"] == pytest.approx(gap[:, obj.buckets["late"]].mean().item(), rel=1e-5)


def test_rollout_fraction_takes_pass_two_on_the_first_examples():
    model = tiny()
    obj = RefineObjective(model, refine_cfg(sample_mode="deterministic", rollout_fraction=0.5))
    sizes = []
    model.backbone.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    x, y = batch(n=5)
    loss, per_token, _ = obj(x, y)
    loss.backward()
    assert sizes == [5, 3] and per_token.shape[0] == 5  # ceil(0.5 x 5) = 3; L_TF on the whole batch


def test_window_means_cover_the_steps_that_carry_a_metric():
    from pipelines.train.worker import LoopState, add_metric, log_row

    window = {}
    for step in range(4):
        add_metric(window, "loss", torch.tensor(float(step)), steps=1)
        if step == 3:  # a metric of the log step only
            add_metric(window, "gap_late", torch.tensor(5.0), steps=1)
    row = log_row(LoopState(step=4), window, 1.0, 0.0, 8, 16, 1e-4)
    assert row["loss"] == 1.5 and row["gap_late"] == 5.0


def test_bfloat16_shards_are_read_as_values():
    g = make_grouping_for_grid()
    mean = torch.randn(2, 4, 4, 3).to(torch.bfloat16)
    bits = mean.view(torch.uint16)  # what a bfloat16 Parquet shard holds
    rows = {"mean": bits, "mean_flip": bits, "label": torch.tensor([0, 1])}
    x, _ = tokens_from_batch(rows, g, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(g.to_grid(x), mean.float())


def test_refine_length_and_ema_follow_the_dataset():
    """10 epochs of the dataset at the global batch, and an EMA that keeps <= 5% of the start weights."""
    from pipelines.train.driver import EMA_START_SHARE, resolve_length

    refine = load_config(None).refine  # the papers' defaults: epochs 10, batch 2048, derived EMA
    imagenet = resolve_length(refine, 1_281_167)
    assert imagenet.steps == 6256 and 0.9994 < imagenet.ema_decay < 0.9996
    assert imagenet.ema_decay ** imagenet.steps == pytest.approx(EMA_START_SHARE)
    fixed = resolve_length(refine.model_copy(update={"steps": 50, "ema_decay": 0.9}), 1_281_167)
    assert (fixed.steps, fixed.ema_decay) == (50, 0.9)  # explicit values win
    assert resolve_length(load_config(None).pretrain, 10).steps == 250_000


def test_a_length_in_epochs_takes_at_least_min_steps():
    """min_steps lifts a small set's epochs to that many steps, leaves a larger set's epochs alone,
    and yields to an explicit `steps`; the EMA derived from the length follows the lifted length."""
    from pipelines.train.driver import EMA_START_SHARE, resolve_length

    pretrain = load_config(None).pretrain.model_copy(update={"steps": None, "epochs": 48, "global_batch": 32,
                                                             "min_steps": 6000})
    assert resolve_length(pretrain, 4000).steps == 6000   # MNIST: 48 epochs are 6,000 steps already
    assert resolve_length(pretrain, 1340).steps == 6000   # UCI digits: 2,010 steps lifted
    assert resolve_length(pretrain, 8000).steps == 12000  # a larger set keeps its epochs
    assert resolve_length(pretrain.model_copy(update={"min_steps": None}), 1340).steps == 2010
    assert resolve_length(pretrain.model_copy(update={"steps": 500}), 1340).steps == 500
    derived = resolve_length(pretrain.model_copy(update={"ema_decay": None}), 1340)
    assert derived.ema_decay ** 6000 == pytest.approx(EMA_START_SHARE)


@pytest.mark.parametrize("mode", ["deterministic", "stochastic", "cfg"])
def test_refine_runs_with_the_ddpm_head(mode):
    """The refine objective trains a DDPM head (its loss) and samples it (ancestral steps drawing
    their noise from the step's generator, so the sample step is reproducible)."""
    obj, calls, loss, (x, y) = refine_step(head="ddpm", sample_mode=mode)
    assert sum(calls) == 2 and torch.isfinite(loss)
    z = obj.model(x, y).detach()
    a, b = (obj.rollout_tokens(x, y, z, torch.Generator().manual_seed(4)) for _ in range(2))
    assert torch.equal(a, b)


def test_named_scale_schedule_resolves_for_the_dataset_grid():
    from models.grouping import VAR_10
    from pipelines.core.errors import DatasetMismatch
    from pipelines.train.driver import build_model_config, check_dataset

    model = load_config(None, ["model.preset=tiny", "model.grouping=next-scale", "model.scales=var-10"]).model
    manifest = {"grid": [16, 16], "token_dim": 6, "num_classes": 3, "grouping": "next-scale", "scales": list(VAR_10)}
    model_config = build_model_config(model, manifest)
    assert model_config["scales"] == list(VAR_10)
    check_dataset(manifest, model_config, "pretrain")
    with pytest.raises(DatasetMismatch, match=r"scales: dataset has \[1, 2, 4, 8, 16\]"):
        check_dataset({**manifest, "scales": [1, 2, 4, 8, 16]}, model_config, "pretrain")
    assert build_model_config(model, {**manifest, "grid": [8, 8]})["scales"] == [1, 2, 3, 4, 5, 7, 8]


@pytest.mark.parametrize("rollout", ["second-to-last", "random-one"])
def test_one_group_rollout_samples_only_the_groups_it_feeds_and_targets(rollout):
    """The sample step of a one-group rollout runs the head on groups k and k + 1 alone, and gives there
    what the every-position sample step gives (the head samples each token from its own condition)."""
    model = tiny().eval()
    with torch.no_grad():  # a head with an output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = RefineObjective(model, refine_cfg(sample_mode="deterministic", rollout_groups=rollout)).eval()
    asked = []
    sample = obj.rollout_tokens
    obj.rollout_tokens = lambda *a, positions=None: asked.append(positions) or sample(*a, positions=positions)
    x, y = batch()
    obj(x, y, torch.Generator().manual_seed(0))
    k, gi = obj.rollout_group(torch.Generator().manual_seed(0)), model.grouping.group_index
    assert asked[0].tolist() == torch.nonzero((gi == k) | (gi == k + 1)).squeeze(1).tolist()
    with torch.no_grad():
        z = model(x, y)
        part, full = sample(x, y, z, None, positions=asked[0]), sample(x, y, z, None)
    assert part.shape == (4, len(asked[0]), 6)
    torch.testing.assert_close(part, full[:, asked[0]], atol=1e-6, rtol=0)
