"""The doors around the core: inputs and states that used to let a NaN through or crash late.

Each test names one door (issue 12's "Safety" list); docs/safety.md lists them all.
"""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
import torch.nn.utils as tnu
from torch import nn

import gradguard as gg
from gradguard.guard import GuardError

torch.set_num_threads(1)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def backward(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(6, 4, generator=g)).pow(2).mean()
    loss.backward()
    return loss


# -- the trainable set --------------------------------------------------------------------------
def test_unfrozen_layer_is_refused_before_its_nan_reaches_the_weights() -> None:
    model = mlp()
    model[0].requires_grad_(False)  # a frozen backbone
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the usual: every parameter in the optimizer
    guard = gg.Guard(model)
    backward(model)
    guard.step(opt)
    opt.zero_grad()
    model[0].requires_grad_(True)  # gradual unfreezing
    backward(model)
    model[0].weight.grad[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GuardError, match=r"parameter '0\.weight' was frozen when the Guard was built"):
        guard.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # a new Guard built after unfreezing checks it: the NaN step is skipped
    guard = gg.Guard(model)
    assert bool(guard.step(opt).skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_param_group_added_later_is_checked() -> None:
    model = mlp()
    model[2].requires_grad_(False)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    guard = gg.Guard(model[0])  # the Guard on the trainable part only
    backward(model)
    guard.step(opt)
    model[2].requires_grad_(True)
    opt.add_param_group({"params": list(model[2].parameters())})
    backward(model)
    with pytest.raises(ValueError, match=r"the first: a parameter of shape \(2, 8\), outside the model"):
        guard.step(opt)


def test_the_watch_costs_no_walk_for_a_fully_trainable_model() -> None:
    guard = gg.Guard(mlp())
    assert guard._frozen == ()


# -- state from a different configuration -------------------------------------------------------
def _trained(policy: gg.ClipPolicy, steps: int = 4) -> gg.Guard:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=policy)
    for t in range(steps):
        backward(model, t)
        guard.step(opt)
        opt.zero_grad()
    return guard


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("saved,loaded,setting", [
    (gg.ZClip(warmup=2), gg.ZClip(warmup=25), "warmup=2"),
    (gg.AutoClip(window=8), gg.AutoClip(window=16), "window=8"),
    (gg.FixedClip(1.0), gg.FixedClip(2.0), "max_norm=1.0"),
    (gg.AGC(clipping=0.02), gg.AGC(clipping=0.01), "clipping=0.02"),
])
def test_state_from_another_configuration_is_refused(saved, loaded, setting) -> None:
    state = _round_trip(_trained(saved).state_dict())
    model = mlp()
    guard = gg.Guard(model, clip=loaded)
    step_before = guard.step_count
    with pytest.raises(ValueError, match=rf"saved with {setting}.*strict=False"):
        guard.load_state_dict(state)
    assert guard.step_count == step_before  # nothing was half-loaded
    with pytest.raises(ValueError, match=rf"saved with {setting}"):
        loaded.load_state_dict(state["policy"])


def test_strict_false_loads_with_a_warning_but_shapes_are_still_checked(caplog) -> None:
    zs = _round_trip(_trained(gg.ZClip(warmup=2)).state_dict())
    z = gg.ZClip(warmup=3)
    gg.Guard(mlp(), clip=z)
    with caplog.at_level(logging.WARNING, logger="gradguard"):
        z.load_state_dict(zs["policy"], strict=False)
    assert "saved with warmup=2" in caplog.text and "strict=False" in caplog.text
    assert torch.equal(z.state.count, zs["policy"]["state"]["count"].to(z.state.count.dtype))
    a = _round_trip(_trained(gg.AutoClip(window=8)).state_dict())
    other = gg.AutoClip(window=16)
    gg.Guard(mlp(), clip=other)
    with pytest.raises(ValueError, match=r"'history' has shape \(8,\) in the checkpoint but \(16,\)"):
        other.load_state_dict(a["policy"], strict=False)


def test_same_configuration_round_trips_with_weights_only() -> None:
    g1 = _trained(gg.ZClip(warmup=2), steps=6)
    g2 = gg.Guard(mlp(), clip=gg.ZClip(warmup=2))
    g2.load_state_dict(_round_trip(g1.state_dict()))
    for k, v in g1.clip.state._asdict().items():
        assert torch.equal(v, getattr(g2.clip.state, k))


# -- inputs torch accepts -------------------------------------------------------------------------
def _complex_pair() -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, dtype=dt)) for dt in (torch.complex64, torch.complex64)]
    for p in a:
        p.grad = torch.randn_like(p) * 10
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        q.grad = p.grad.clone()
    return a, b


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_complex_gradients_give_what_torch_gives(norm_type) -> None:
    ours, ref = _complex_pair()
    total = gg.clip_grad_norm_(ours, 1.0, norm_type)
    expected = tnu.clip_grad_norm_(ref, 1.0, norm_type)
    assert torch.equal(total, expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))
    s = gg.grad_stats(ours, norm_type)
    assert s.global_norm.dtype == torch.float32 and not bool(s.nonfinite)


def test_complex_model_under_a_guard() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 3, dtype=torch.complex64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=0.5)
    model(torch.randn(4, 3, dtype=torch.complex64)).abs().pow(2).mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    expected = tnu.get_total_norm(ref)
    out = guard.step(opt)
    assert torch.equal(out.global_norm, expected) and bool(out.clipped)


def test_tensor_max_norm_and_clip_value_work_as_in_torch() -> None:
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5)) for _ in range(2)]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref):
        p.grad = torch.randn_like(p) * 5
        q.grad = p.grad.clone()
    limit = torch.tensor(0.7)
    assert torch.equal(gg.clip_grad_norm_(ours, limit), tnu.clip_grad_norm_(ref, limit))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))
    gg.clip_grad_value_(ours, torch.tensor(0.01))
    tnu.clip_grad_value_(ref, torch.tensor(0.01))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))
    gg.clip_grads_with_norm_(ours, torch.tensor(0.001), torch.tensor(1.0))
    tnu.clip_grads_with_norm_(ref, torch.tensor(0.001), torch.tensor(1.0))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))


def test_sparse_gradients_get_an_error_naming_the_parameter() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    model = nn.Sequential(emb)
    with pytest.raises(TypeError, match=r"module '0' is an Embedding with sparse=True"):
        gg.Guard(model)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"`parameters`\[0\] has a sparse \(torch.sparse_coo\) gradient"):
        gg.clip_grad_norm_(emb.parameters(), 1.0)
    with pytest.raises(TypeError, match=r"`parameters`\[0\] has a sparse"):
        gg.grad_stats(emb.parameters())
    # a sparse gradient that appears later (set by hand) is named by the Guard too
    lin = mlp()
    guard = gg.Guard(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    backward(lin)
    lin[2].bias.grad = lin[2].bias.grad.to_sparse()
    with pytest.raises(TypeError, match=r"parameter '2\.bias' has a sparse"):
        guard.step(opt)


def test_meta_parameters_get_an_error_naming_the_parameter() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"parameter '0\.weight' is on the meta device"):
        gg.Guard(model)


def test_scaler_of_the_wrong_type_is_a_type_error_naming_it() -> None:
    model = mlp()
    guard = gg.Guard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backward(model)
    with pytest.raises(TypeError, match=r"`scaler` must be a torch.amp.GradScaler .*got str"):
        guard.step(opt, scaler="amp")
    with pytest.raises(TypeError, match=r"`scaler` must be .*got Adam"):
        guard.step(opt, scaler=torch.optim.Adam(model.parameters()))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
], ids=["adam", "adamw", "sgd-momentum", "adagrad"])
def test_poisoned_first_step_with_a_fused_optimizer_leaves_no_state(make) -> None:
    model = mlp()
    opt = make(model.parameters())
    guard = gg.Guard(model)
    backward(model)
    model[0].weight.grad[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: {n: v.clone() for n, v in st.items()} for k, st in opt.state_dict()["state"].items()}
    assert bool(guard.step(opt).skipped)
    if not isinstance(opt, torch.optim.Adagrad):  # Adagrad creates its state in __init__
        assert all(not opt.state.get(p) for p in model.parameters()), "the skipped step created state"
    after = opt.state_dict()["state"]
    assert all(torch.equal(v, after[k][n]) for k, st in state_before.items() for n, v in st.items())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the next, clean step runs as if it were the first
    opt.zero_grad()
    backward(model, 1)
    guard.step(opt)
    ref_model = mlp()
    ref_opt = make(ref_model.parameters())
    backward(ref_model, 1)
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters()))


# -- names --------------------------------------------------------------------------------------
def test_compiled_model_reports_the_original_names() -> None:
    model = mlp()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    guard = gg.Guard(compiled, clip=gg.AGC(exclude=["2"]))
    assert guard.names == [n for n, _ in model.named_parameters()]
    assert guard.clip.excluded == ["2.weight", "2.bias"]  # by the original names
    # a checkpoint from the plain model loads into the compiled one: the names agree
    plain = gg.Guard(mlp())
    gg.Guard(compiled).load_state_dict(plain.state_dict())


def test_compiled_submodule_names() -> None:
    from gradguard._plan import display_name

    assert display_name("encoder._orig_mod.0.weight") == "encoder.0.weight"
    assert display_name("_orig_mod.head.bias") == "head.bias"
    assert display_name("orig_mod_layer.weight") == "orig_mod_layer.weight"


def test_unwrap_compiled_returns_the_users_module() -> None:
    from gradguard._plan import unwrap_compiled

    model = mlp()
    assert unwrap_compiled(torch.compile(model)) is model
    block = nn.Sequential(torch.compile(model))  # a compiled child stays (its parent is plain)
    assert unwrap_compiled(block) is block
    assert unwrap_compiled(model) is model


def test_zclip_docs_statement_matches_the_package() -> None:
    """docs/guard.md: zclip's README (and code) default max_grad_norm=1.0; only the docstring hints None."""
    import importlib.metadata
    import inspect
    import re
    from pathlib import Path

    zclip = pytest.importorskip("zclip")
    readme = importlib.metadata.distribution("zclip").read_text("METADATA") or ""  # README inside
    assert re.search(r"\|\s*`max_grad_norm`\s*\|[^\n]*\|\s*`1\.0`\s*\|", readme)
    assert inspect.signature(zclip.ZClip).parameters["max_grad_norm"].default == 1.0
    assert "float or None" in inspect.getdoc(zclip.ZClip.__init__)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "guard.md").read_text(encoding="utf-8")
    assert "README's\nparameter table" in doc and "README says" not in doc
