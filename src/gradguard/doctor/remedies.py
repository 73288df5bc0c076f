"""Model-level remedies the doctor applies to a *copy* of a model, and the recipes it can try.

Functions that change a model end with ``_`` and change it in place; the doctor always hands them
a deep copy. Each returns the qualified names of what it changed (an empty list means "nothing
here to change", and the doctor then reports the remedy as not applicable).

* :func:`reinit_` — re-initialise weight layers by the activation that follows each one:
  He (Kaiming) before ReLU-family units, Xavier (Glorot, with the activation's gain) before
  sigmoid/tanh and before the output, orthogonal recurrent matrices; biases to zero (an LSTM's
  forget-gate bias to one).
* :func:`swap_activations_` — replace activation *modules* (``nn.Sigmoid``, ``nn.Tanh``, ...) by a
  ReLU-family one. **Activation functions called inside ``forward``** (``torch.sigmoid(x)``,
  ``F.tanh(x)``) **cannot be swapped** from outside: they are part of the code, not of the module
  tree. The probe still sees them; change the code to change them.
* :func:`insert_batch_norm_` — add a batch normalisation between a linear/convolutional layer and
  the activation module that follows it inside an ``nn.Sequential``.
* :func:`swap_recurrent_` — replace ``nn.RNN`` by an ``nn.GRU`` of the same sizes (same call
  signature and outputs, so the surrounding code keeps working).
* :func:`insert_layer_norm_`, :func:`pre_ln_` — normalisation that fits sequences and
  transformers (LayerNorm; torch's Post-LN transformer layers switched to Pre-LN).
* :func:`forget_gate_bias_` — an LSTM's forget gate opened at the start (bias +1).
* :func:`fp32_output_` — logits and loss in float32 for a half-precision model.
* :func:`standardize_` — inputs (and large regression targets) standardised, through hooks.

:func:`fit_remedies` fits a finding's remedy list to the model and the recipe: normalisation that
suits the architecture, nothing the user already does, numerics remedies where they apply.

:data:`TREATMENTS` maps each remedy code to a :class:`Treatment`: the model change (if any) plus
the training-loop changes (clipping, skipping, warm-up, learning-rate factor, optimizer swap) the
doctor applies when it tries the remedy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "TREATMENTS",
    "Treatment",
    "forget_gate_bias_",
    "fp32_output_",
    "insert_batch_norm_",
    "insert_layer_norm_",
    "wrap_norm_",
    "pre_ln_",
    "reinit_",
    "standardize_",
    "swap_activations_",
    "swap_recurrent_",
]

_SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
_ACT_MODULES = _SATURATING + (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU,
                              nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                  nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)
_SCHEMES = ("auto", "he", "xavier", "orthogonal")
#: the update/weight ratio a lowered learning rate aims at (CS231n: ~1e-3 is healthy)
LR_TARGET_RATIO = 3e-3
_RELU_OPS = {"relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "celu", "selu", "gelu",
             "silu", "mish"}


def _gain(op: str | None) -> float:
    if op in ("tanh", "hardtanh", "softsign"):
        return nn.init.calculate_gain("tanh")
    if op in ("sigmoid", "hardsigmoid") or op is None:
        return 1.0
    if op == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", 0.01)
    if op == "selu":
        return nn.init.calculate_gain("selu")
    return nn.init.calculate_gain("relu")


@torch.no_grad()
def reinit_(model: nn.Module, scheme: str = "auto", *,
            follow: Mapping[str, str | None] | None = None) -> list[str]:
    """Re-initialise every weight layer of ``model`` in place.

    Args:
        model (nn.Module): the model (the doctor passes a copy).
        scheme (str, optional): ``"auto"`` (He before ReLU-family units, Xavier before
            sigmoid/tanh and the output, orthogonal recurrent matrices), ``"he"``, ``"xavier"``
            or ``"orthogonal"``. Default: ``"auto"``.
        follow (Mapping[str, str | None], optional): for each layer's qualified name, the
            activation op that follows it (``"relu"``, ``"tanh"``, ``None`` for the output), as
            :func:`gradguard.doctor.activation_map` traces it. Without it, ``nn.Sequential``
            neighbours are used and layers with no known activation count as ReLU layers.

    Returns:
        list[str]: the qualified names of the re-initialised modules.

    References:
        Glorot & Bengio 2010 (Xavier); He et al. 2015 (He/Kaiming); Saxe et al. 2014
        (orthogonal).
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"`scheme` must be one of {_SCHEMES}, got {scheme!r}.")
    fmap = dict(follow) if follow is not None else _sequential_follow(model)
    changed = []
    for name, mod in model.named_modules():
        if isinstance(mod, _WEIGHT_LAYERS):
            op = fmap[name] if name in fmap else ("relu" if follow is None else None)
            w = mod.weight
            if scheme == "he" or (scheme == "auto" and op in _RELU_OPS):
                nn.init.kaiming_normal_(w, nonlinearity="relu")
            elif scheme == "orthogonal":
                _orthogonal(w, _gain(op))
            else:  # xavier, or auto before a saturating activation / the output
                nn.init.xavier_normal_(w, gain=_gain(op))
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)
            changed.append(name)
        elif isinstance(mod, nn.RNNBase):
            h = mod.hidden_size
            for pname, p in mod.named_parameters(recurse=False):
                if pname.startswith("weight_hh"):
                    for k in range(p.shape[0] // h):
                        nn.init.orthogonal_(p[k * h:(k + 1) * h])
                elif pname.startswith("weight"):
                    nn.init.xavier_uniform_(p)
                elif pname.startswith("bias"):
                    nn.init.zeros_(p)
                    if isinstance(mod, nn.LSTM) and pname.startswith("bias_ih"):
                        p[h:2 * h].fill_(1.0)  # forget gate open at the start
            changed.append(name)
    return changed


def _orthogonal(w: torch.Tensor, gain: float) -> None:
    if w.ndim < 2:
        nn.init.normal_(w, 0, gain / math.sqrt(max(1, w.numel())))
    else:
        nn.init.orthogonal_(w, gain=gain)


def _sequential_follow(model: nn.Module) -> dict[str, str | None]:
    """Activation op following each weight layer among ``nn.Sequential`` neighbours."""
    from gradguard.doctor.probes import _module_op

    out: dict[str, str | None] = {}
    for pname, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        children = list(mod.named_children())
        for i, (cname, child) in enumerate(children):
            if not isinstance(child, _WEIGHT_LAYERS):
                continue
            op = None
            for _, nxt in children[i + 1:]:
                if isinstance(nxt, _WEIGHT_LAYERS):
                    break
                op = _module_op(nxt) or op
                if op:
                    break
            out[f"{pname}.{cname}" if pname else cname] = op
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_activations_(model: nn.Module, to: str = "relu", *,
                      kinds: tuple[type[nn.Module], ...] = _SATURATING,
                      skip: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Replace activation modules of the given ``kinds`` by ``to``, in place.

    Only modules are swapped: an activation called as a function inside ``forward``
    (``torch.sigmoid(x)``) is code, and stays as it is.

    Args:
        model (nn.Module): the model (the doctor passes a copy).
        to (str, optional): ``"relu"``, ``"leaky_relu"``, ``"gelu"`` or ``"elu"``. Default: ``"relu"``.
        kinds (tuple of module classes, optional): what to replace. Default: sigmoid, tanh,
            hardtanh, hardsigmoid, softsign.
        skip (set of str, optional): qualified names to keep (e.g. the output activation).

    Returns:
        list[str]: the qualified names of the swapped modules.
    """
    makers: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "gelu": nn.GELU, "elu": nn.ELU,
    }
    if to not in makers:
        raise ValueError(f"`to` must be one of {sorted(makers)}, got {to!r}.")
    targets = [n for n, m in model.named_modules()
               if n and type(m) in kinds and n not in skip]
    for n in targets:
        _replace(model, n, makers[to]())
    return targets


class _FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (feature) dimension, for inputs of any rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.ndim == 2:
            return super().forward(x)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


def insert_batch_norm_(model: nn.Module) -> list[str]:
    """Insert batch normalisation after each linear/conv layer followed by an activation module.

    Only ``nn.Sequential`` containers are edited (elsewhere the data flow lives in ``forward``).

    Returns:
        list[str]: qualified names of the layers that got a normalisation after them.
    """
    from gradguard.doctor.probes import _module_op

    changed = []
    for pname, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        new: list[nn.Module] = []
        touched = False
        for i, (cname, child) in enumerate(children):
            new.append(child)
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if nxt is None or _module_op(nxt) is None:
                continue
            norm: nn.Module | None = None
            if isinstance(child, nn.Linear):
                norm = _FeatureBatchNorm(child.out_features)
            elif isinstance(child, nn.Conv2d):
                norm = nn.BatchNorm2d(child.out_channels)
            elif isinstance(child, nn.Conv1d):
                norm = nn.BatchNorm1d(child.out_channels)
            if norm is not None:
                p = next(child.parameters())
                new.append(norm.to(device=p.device, dtype=p.dtype))
                changed.append(f"{pname}.{cname}" if pname else cname)
                touched = True
        if touched:
            # rebuild in place so that references to the container stay valid
            for key in list(seq._modules):
                del seq._modules[key]
            for k, m in enumerate(new):
                seq.add_module(str(k), m)
    return changed


def swap_recurrent_(model: nn.Module) -> list[str]:
    """Replace every ``nn.RNN`` by an ``nn.GRU`` of the same sizes, in place.

    A GRU takes the same arguments and returns the same ``(output, h_n)`` pair, so the code
    around it keeps working; an LSTM would return ``(h_n, c_n)`` and break it.

    Returns:
        list[str]: qualified names of the swapped modules.
    """
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.RNN]
    for n, m in targets:
        p = next(m.parameters())
        gru = nn.GRU(m.input_size, m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                     batch_first=m.batch_first, dropout=m.dropout,
                     bidirectional=m.bidirectional).to(device=p.device, dtype=p.dtype)
        _replace(model, n, gru)
    return [n for n, _ in targets]


def wrap_norm_(model: nn.Module, follow: Mapping[str, str | None], kind: str) -> list[str]:
    """Normalise the output of every linear/convolutional layer that an activation follows (as
    traced, functional calls included), by replacing the layer with ``Sequential(layer, norm)``:
    for models whose activations live in ``forward`` rather than in ``nn.Sequential``.

    Args:
        model: the model (the doctor passes a copy).
        follow: the activation op after each layer (:func:`gradguard.doctor.activation_map`).
        kind: ``"batch"`` (BatchNorm) or ``"layer"`` (LayerNorm over features, linear layers).

    Returns:
        list[str]: qualified names of the layers that got a normalisation.
    """
    changed = []
    for name, mod in list(model.named_modules()):
        if not name or follow.get(name) is None:
            continue
        norm: nn.Module | None = None
        if isinstance(mod, nn.Linear):
            norm = _FeatureBatchNorm(mod.out_features) if kind == "batch" else nn.LayerNorm(
                mod.out_features)
        elif kind == "batch" and isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            norm = (nn.BatchNorm2d if isinstance(mod, nn.Conv2d) else nn.BatchNorm1d)(
                mod.out_channels)
        if norm is None:
            continue
        p = mod.weight
        _replace(model, name, nn.Sequential(mod, norm.to(device=p.device, dtype=p.dtype)))
        changed.append(name)
    return changed


def insert_layer_norm_(model: nn.Module) -> list[str]:
    """Normalise with LayerNorm where batch statistics do not fit (sequences, transformers):
    after each linear layer followed by an activation module inside an ``nn.Sequential``, and on
    the output sequence of each recurrent module (a forward hook on a LayerNorm it owns).

    Returns:
        list[str]: qualified names of the layers that got a normalisation after them.
    """
    from gradguard.doctor.probes import _module_op

    changed = []
    for pname, seq in list(model.named_modules()):
        if isinstance(seq, nn.RNNBase):
            p = next(seq.parameters())
            width = seq.hidden_size * (2 if seq.bidirectional else 1)
            seq.add_module("out_norm", nn.LayerNorm(width).to(device=p.device, dtype=p.dtype))
            seq.register_forward_hook(_normalise_rnn_output)
            changed.append(pname)
            continue
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        new: list[nn.Module] = []
        for i, (cname, child) in enumerate(children):
            new.append(child)
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if isinstance(child, nn.Linear) and nxt is not None and _module_op(nxt) is not None:
                p = child.weight
                new.append(nn.LayerNorm(child.out_features).to(device=p.device, dtype=p.dtype))
                changed.append(f"{pname}.{cname}" if pname else cname)
        if len(new) != len(children):
            for key in list(seq._modules):
                del seq._modules[key]
            for k, m in enumerate(new):
                seq.add_module(str(k), m)
    return changed


def _normalise_rnn_output(mod: nn.Module, args: Any, out: Any) -> Any:
    y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    if not isinstance(y, torch.Tensor):
        return out  # a PackedSequence: left as it is
    y = mod.out_norm(y)
    return (y, *rest) if isinstance(out, tuple) else y


def pre_ln_(model: nn.Module) -> list[str]:
    """Move the LayerNorms of torch's Post-LN transformer layers in front of their sublayers
    (``norm_first=True``: Xiong et al. 2020). Custom blocks are code, and stay as they are.

    Returns:
        list[str]: qualified names of the layers switched to Pre-LN.
    """
    changed = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and \
                not mod.norm_first:
            mod.norm_first = True
            changed.append(name)
    return changed


def forget_gate_bias_(model: nn.Module) -> list[str]:
    """Open every LSTM's forget gate at the start: its bias at +1 (``bias_ih`` 1, ``bias_hh`` 0;
    Gers et al. 2000, Jozefowicz et al. 2015), every layer and direction.

    Returns:
        list[str]: qualified names of the LSTMs changed.
    """
    changed = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.LSTM) and mod.bias:
                h = mod.hidden_size
                for pname, p in mod.named_parameters(recurse=False):
                    if pname.startswith("bias_ih"):
                        p[h:2 * h].fill_(1.0)
                    elif pname.startswith("bias_hh"):
                        p[h:2 * h].zero_()
                changed.append(name)
    return changed


def fp32_output_(model: nn.Module, output_layer: str | None = None) -> list[str]:
    """Compute the logits (and so the loss) in float32 in a half-precision model: the output layer
    is moved to float32 (its input is cast up) and the model's output is returned as float32.

    Args:
        model: the model (the doctor passes a copy).
        output_layer: the qualified name of the layer that produces the output (the doctor
            traces it); default: the last ``nn.Linear`` in module order.

    Returns:
        list[str]: the layers moved to float32; empty when the model has no half-precision
        parameter (nothing to do).
    """
    half = (torch.float16, torch.bfloat16)
    if not any(p.dtype in half for p in model.parameters()):
        return []
    name = output_layer
    if name is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        name = linears[-1] if linears else None
    changed = []
    if name is not None:
        layer = model.get_submodule(name)
        layer.float()
        layer.register_forward_pre_hook(lambda m, args: tuple(
            a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args))
        changed.append(name)
    model.register_forward_hook(lambda m, args, out: out.float()
                                if isinstance(out, torch.Tensor) and out.dtype in half else out)
    return changed or [""]


def standardize_(model: nn.Module, x_mean: torch.Tensor, x_std: torch.Tensor,
                 y_mean: torch.Tensor | None = None, y_std: torch.Tensor | None = None
                 ) -> list[str]:
    """Standardise the model's input per feature, and (for regression targets of a large scale)
    train the model on standardised targets: its output is mapped back to the targets' units, so
    the loss stays the one you measure. Done with hooks on the root module.

    Returns:
        list[str]: ``["inputs"]``, plus ``"targets"`` when they are rescaled.
    """
    def pre(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = (x - x_mean.to(x)) / x_std.to(x)
        return (x, *args[1:])

    model.register_forward_pre_hook(pre)
    changed = ["inputs"]
    if y_mean is not None and y_std is not None:
        model.register_forward_hook(lambda m, args, out: out * y_std.to(out) + y_mean.to(out))
        changed.append("targets")
    return changed


@dataclass(frozen=True)
class Treatment:
    """How the doctor tries one remedy code on a copy of the model.

    Attributes:
        code: the remedy code.
        model_fn: changes the model copy in place and returns what it changed (None: no model
            change). Called as ``model_fn(model, context)`` with the traced activation map.
        clip: clip the global gradient norm (at the median of the baseline's early norms).
        skip_nonfinite: skip steps whose gradients are not finite.
        skip_spikes: skip steps whose gradient norm jumps far above its running median.
        warmup: ramp the learning rate up linearly over the first third of the steps.
        lr_factor: multiply every learning rate by this.
        lr_from_evidence: when the doctor measured the update/weight ratio, lower the learning
            rate further so that it would be about ``LR_TARGET_RATIO`` (``lr_factor`` at most).
        adam: replace the optimizer by Adam (lr 1e-3).
        manual: the remedy needs a code change the doctor cannot make (it is advised, not tried).
        mean_loss: divide the loss by the number of elements it sums over before the backward
            pass (what ``reduction="mean"`` does); the loss is still reported as the user's.
        target_scale: with standardised regression targets, divide the loss by their variance
            before the backward pass (the loss the model would be trained on in standard units);
            the loss is still reported in the user's units.
        lr_search: learning-rate factors to try, in order (the best by loss is kept and reported).
    """

    code: str
    model_fn: Callable[[nn.Module, Mapping[str, Any]], list[str]] | None = None
    clip: bool = False
    skip_nonfinite: bool = False
    skip_spikes: bool = False
    warmup: bool = False
    lr_factor: float = 1.0
    lr_from_evidence: bool = False
    adam: bool = False
    manual: bool = False
    mean_loss: bool = False
    target_scale: bool = False
    lr_search: tuple[float, ...] = ()

    @property
    def needs_optimizer(self) -> bool:
        """Whether the remedy only acts through training (clipping, LR, optimizer)."""
        return self.model_fn is None and not self.manual and not self.mean_loss


def _relu_family(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    follow: dict[str, str | None] = dict(ctx.get("follow", {}))
    swapped = swap_activations_(model, "relu", skip=set(ctx.get("output_sites", ())))
    if not swapped:
        return []
    after = ctx.get("follow_site", {})
    for layer, site in after.items():
        if site in swapped:
            follow[layer] = "relu"
    reinit_(model, "auto", follow=follow)
    return swapped


def _leaky(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    return swap_activations_(model, "leaky_relu", kinds=(nn.ReLU, nn.ReLU6),
                             skip=set(ctx.get("output_sites", ())))


def _reinit(scheme: str) -> Callable[[nn.Module, Mapping[str, Any]], list[str]]:
    def fn(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
        follow = ctx.get("follow")
        return reinit_(model, scheme, follow=follow if follow else None)

    return fn


def _batch_norm(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    return insert_batch_norm_(model) or wrap_norm_(model, ctx.get("follow") or {}, "batch")


def _gated(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    return swap_recurrent_(model)


def _layer_norm(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    return insert_layer_norm_(model) or wrap_norm_(model, ctx.get("follow") or {}, "layer")


def _pre_ln(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    return pre_ln_(model)


def _forget_bias(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    return forget_gate_bias_(model)


def _fp32(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    return fp32_output_(model, ctx.get("output_layer"))


def _standardize(model: nn.Module, ctx: Mapping[str, Any]) -> list[str]:
    stats = ctx.get("data_stats")
    if not stats:
        return []
    return standardize_(model, *stats)


#: remedy code -> how to try it. Codes marked ``manual`` are advised, never tried automatically.
TREATMENTS: dict[str, Treatment] = {
    t.code: t
    for t in (
        Treatment("relu_family", _relu_family),
        Treatment("he_init", _reinit("he")),
        Treatment("xavier_init", _reinit("xavier")),
        Treatment("orthogonal_init", _reinit("orthogonal")),
        Treatment("batch_norm", _batch_norm),
        Treatment("gated_recurrence", _gated),
        Treatment("leaky_relu", _leaky),
        Treatment("gradient_clipping", clip=True),
        Treatment("skip_nonfinite_steps", skip_nonfinite=True),
        Treatment("spike_skipping", skip_spikes=True),
        Treatment("lr_schedule", warmup=True),
        Treatment("lower_learning_rate", lr_factor=0.1, lr_from_evidence=True,
                  lr_search=(1 / 3, 1 / 10, 1 / 30, 1 / 100)),
        Treatment("raise_learning_rate", lr_factor=10.0, lr_search=(3.0, 10.0)),
        Treatment("layer_norm", _layer_norm),
        Treatment("pre_ln", _pre_ln),
        Treatment("forget_gate_bias", _forget_bias),
        Treatment("fp32_logits", _fp32),
        Treatment("standardize_data", _standardize, target_scale=True),
        Treatment("mean_reduction", mean_loss=True),
        Treatment("adaptive_optimizer", adam=True),
        Treatment("residual_connections", manual=True),
        Treatment("stable_loss", manual=True),
        Treatment("weight_decay", manual=True),
    )
}


# -- fitting remedies to the model and the recipe --------------------------------------------------
#: optimizers that already adapt the step per parameter: "use an adaptive optimizer" is not advice
ADAPTIVE_OPTIMIZERS = frozenset({"Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta",
                                 "RMSprop", "SparseAdam", "Adafactor", "Muon"})
_TRANSFORMER_TYPES = (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                      nn.TransformerDecoderLayer)
#: findings an unstable scale (half precision, unscaled data, a summed loss) can cause
_INSTABILITY = ("nonfinite_loss", "nonfinite_gradients", "exploding_gradients",
                "learning_rate_too_high", "loss_divergence", "loss_spike")


@dataclass(frozen=True)
class ModelFacts:
    """What the doctor knows about the model and the recipe when it fits the remedies.

    Attributes:
        kind: ``"transformer"``, ``"recurrent"``, ``"cnn"`` or ``"mlp"``.
        batch_norm: the model has batch normalisation.
        layer_norm: the model has LayerNorm/RMSNorm/GroupNorm.
        post_ln: torch transformer layers with ``norm_first=False``.
        half: some parameters are float16/bfloat16.
        lstm: the model has an ``nn.LSTM``.
        adaptive: the optimizer is already adaptive (Adam & co.).
        clips: the recipe already clips the gradient norm.
        warms_up: the recipe's scheduler already warms the learning rate up.
        unscaled_data: the inputs (or regression targets) are far from unit scale.
    """

    kind: str = "mlp"
    batch_norm: bool = False
    layer_norm: bool = False
    post_ln: bool = False
    half: bool = False
    lstm: bool = False
    adaptive: bool = False
    clips: bool = False
    warms_up: bool = False
    unscaled_data: bool = False

    @property
    def norm_remedy(self) -> str | None:
        """The normalisation that fits this architecture, or None when it already has it."""
        if self.kind == "transformer":
            return "pre_ln" if self.post_ln else (None if self.layer_norm else "layer_norm")
        if self.kind == "recurrent":
            return None if self.layer_norm else "layer_norm"
        return None if (self.batch_norm or self.layer_norm) else "batch_norm"


def model_facts(model: nn.Module, optimizer: Any = None, *, clip: float | None = None,
                lrs: list[float] | None = None, unscaled_data: bool = False) -> ModelFacts:
    """Read :class:`ModelFacts` off a model, its optimizer and the learning rates of a run."""
    mods = list(model.modules())
    if any(isinstance(m, _TRANSFORMER_TYPES) for m in mods):
        kind = "transformer"
    elif any(isinstance(m, nn.RNNBase) for m in mods):
        kind = "recurrent"
    elif any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in mods):
        kind = "cnn"
    else:
        kind = "mlp"
    names = [type(m).__name__ for m in mods]
    warms = False
    if lrs:
        finite = [v for v in lrs if math.isfinite(v)]
        head = finite[: max(2, len(finite) // 2)]
        warms = bool(head) and head[0] < 0.5 * max(head)
    return ModelFacts(
        kind=kind,
        batch_norm=any(n.startswith("BatchNorm") or n == "SyncBatchNorm" for n in names),
        layer_norm=any(n in ("LayerNorm", "RMSNorm", "GroupNorm") for n in names),
        post_ln=any(isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
                    and not m.norm_first for m in mods),
        half=any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()),
        lstm=any(isinstance(m, nn.LSTM) for m in mods),
        adaptive=optimizer is not None and type(optimizer).__name__ in ADAPTIVE_OPTIMIZERS,
        clips=clip is not None,
        warms_up=warms,
        unscaled_data=unscaled_data,
    )


def fit_remedies(findings: list[Any], facts: ModelFacts) -> None:
    """Fit each finding's remedies (and causes) to the model and the recipe, in place.

    Normalisation that suits the architecture replaces ``batch_norm`` (LayerNorm or Pre-LN for
    transformers and recurrent nets; none where the model already normalises); nothing the
    recipe already does is offered (an adaptive optimizer to an Adam user, clipping to a run that
    clips, warm-up to a schedule that warms up); under half precision, computing the logits in
    float32 comes first for overflow; standardising the data comes first when it is unscaled.
    """
    norm = facts.norm_remedy
    for f in findings:
        rs: list[str] = []
        for r in f.remedies:
            if r == "batch_norm":
                r = norm or ""
            if (not r or (r == "adaptive_optimizer" and facts.adaptive)
                    or (r == "gradient_clipping" and facts.clips)
                    or (r == "lr_schedule" and facts.warms_up)
                    or (r in ("relu_family", "leaky_relu") and facts.kind == "transformer")):
                continue
            rs.append(r)
        causes = list(f.causes)
        if f.code in _INSTABILITY + ("vanishing_gradients", "saturated_activations",
                                    "dead_units") and facts.unscaled_data:
            rs.insert(0, "standardize_data")
            causes.insert(0, "unscaled_data")
        if f.code in _INSTABILITY and facts.half:  # overflow in half precision comes first
            rs.insert(0, "fp32_logits")
            causes.insert(0, "half_precision")
        if facts.adaptive and "lower_learning_rate" in rs and "lr_schedule" not in rs \
                and not facts.warms_up and f.code in _INSTABILITY:
            rs.append("lr_schedule")  # the Adam user's sibling of "switch optimizer": warm up
        f.remedies = list(dict.fromkeys(rs))
        f.causes = list(dict.fromkeys(causes))
