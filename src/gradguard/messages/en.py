"""English texts: every finding, cause, remedy and trial-note code, and the report's own words.

Placeholders in ``{braces}`` are filled from the finding's evidence by
:func:`gradguard.messages.finding_text` (numbers already formatted). A finding's ``text`` is a
dict of variants chosen from the evidence (e.g. gradients vanishing across depth or through time).
"""

FINDINGS: dict[str, dict[str, object]] = {
    "vanishing_gradients": {
        "title": "Vanishing gradients",
        "text": {
            "depth": (
                "Gradients shrink on their way back to the input. The first layer, {first_layer}, "
                "gets a gradient {ratio} times that of the best-fed later layer: about ×{decay} "
                "per layer over {depth} {depth|layer|layers}. {n_layers} {n_layers|layer sits|layers sit} at least 10× below it, so "
                "they barely learn."
            ),
            "time": (
                "The gradient fades through time inside {first_layer}: the first of "
                "{time_steps} {time_steps|time step|time steps} receives {ratio} times the gradient of the last, a factor "
                "of about ×{decay} per step. The layer cannot learn anything that depends on "
                "more than a few steps back."
            ),
        },
    },
    "exploding_gradients": {
        "title": "Exploding gradients",
        "text": {
            "depth": (
                "Gradients grow on their way back to the input: the first layer's gradient is "
                "{ratio} times the smallest later one (about ×{growth} per layer). One step of "
                "any usual learning rate will throw the early layers far from where they are."
            ),
            "weights": (
                "The gradients are {rel_grad} times larger than the weights they belong to "
                "(median over layers, at the starting weights). A single SGD step would replace "
                "the weights rather than nudge them."
            ),
            "time": (
                "The gradient grows through time inside {first_layer}: the first of "
                "{time_steps} {time_steps|time step|time steps} receives {ratio} times the gradient of the last, about "
                "×{growth_step} per step. Longer sequences or larger weights will overflow."
            ),
            "steps": (
                "The global gradient norm rose from about {early_norm} to {peak_norm} during the "
                "run (×{growth}) and stayed ×{sustained} above where it started."
            ),
        },
    },
    "nonfinite_gradients": {
        "title": "Non-finite gradients (NaN/Inf)",
        "text": {
            "text": (
                "Gradients became NaN or Inf at step {first_step} ({steps} of {rows} {rows|step|steps}) while "
                "the loss was still finite. {n_layers} {n_layers|layer|layers} carried them; backpropagation met "
                "them first at {origin}, the deepest of those layers."
            ),
        },
    },
    "nonfinite_loss": {
        "title": "Non-finite loss (NaN/Inf)",
        "text": {
            "loss_fn": (
                "The loss was NaN or Inf from the very first step although the model's outputs "
                "were finite: the loss function itself overflows (log of 0, exp of a large "
                "number, a division by ~0)."
            ),
            "start": (
                "The loss was NaN or Inf from the very first step, and the forward pass already "
                "produced non-finite values in {origin}."
            ),
            "training": (
                "The loss turned NaN or Inf at step {first_step} after {first_step} finite steps "
                "(last finite loss {last_finite_loss}); the gradient norm had grown ×{growth_before} "
                "before that. The first layer with non-finite outputs was {origin}."
            ),
        },
    },
    "saturated_activations": {
        "title": "Saturated activations",
        "text": {
            "text": (
                "{ops} {ops|unit is|units are} pinned near their bounds, where their derivative is under 5% of "
                "its peak: up to {worst_pct} of the outputs in {n_layers} {n_layers|layer|layers} (mean "
                "{mean_pct}). Saturated units pass almost no gradient back."
            ),
        },
    },
    "dead_units": {
        "title": "Dead ReLU units",
        "text": {
            "init": (
                "In {n_layers} {n_layers|layer|layers}, up to {worst_pct} of the ReLU units (mean {mean_pct}) were "
                "active on fewer than 1% of the sampled examples. A dead unit outputs 0 and gets 0 "
                "gradient, so it cannot come back by itself."
            ),
            "training": (
                "ReLU units died during training: over the last steps, up to {worst_pct} of the "
                "units in {n_layers} {n_layers|layer|layers} (mean {mean_pct}) were active on fewer than 1% of the "
                "examples, many more than at the start. Large updates pushed their inputs below "
                "zero for almost every example."
            ),
        },
    },
    "activation_scale_drift": {
        "title": "Activation scale drifts with depth",
        "text": {
            "shrinks": (
                "Activations shrink geometrically with depth: the output scale (RMS) falls from "
                "{first_rms} to {last_rms} over {depth} {depth|layer|layers}, about ×{factor} per layer. The "
                "initial weights are too small for this activation, and the backward pass "
                "shrinks the same way."
            ),
            "grows": (
                "Activations grow geometrically with depth: the output scale (RMS) rises from "
                "{first_rms} to {last_rms} over {depth} {depth|layer|layers}, about ×{factor} per layer. The "
                "initial weights are too large for this activation."
            ),
        },
    },
    "learning_rate_too_high": {
        "title": "Learning rate too high",
        "text": {
            "text": (
                "Each step changes the weights by {update_ratio} of their norm (median; up to "
                "{max_update_ratio}), where about 0.001 is typical of healthy training, and the "
                "loss does not improve: {loss_first} at the start, {loss_last} at the end."
            ),
            "diverged": (
                "Each step changes the weights by {update_ratio} of their norm (median; up to "
                "{max_update_ratio}), where about 0.001 is typical of healthy training, and the "
                "run diverged to NaN/Inf."
            ),
        },
    },
    "training_stalled": {
        "title": "Training stalled",
        "text": {
            "text": (
                "The loss stayed flat ({loss_first} → {loss_last}) and the updates are "
                "negligible: each step moves the weights by {update_ratio} of their norm "
                "(median over the run)."
            ),
        },
    },
    "loss_spike": {
        "title": "Loss spike",
        "text": {
            "loss": (
                "The loss jumped ×{ratio} above its recent median at step {first_step} "
                "(robust z-score {z}) and came back down: {count} such {count|spike|spikes} in the run."
            ),
            "grad_norm": (
                "The gradient norm jumped ×{ratio} above its recent median at step {first_step} "
                "(robust z-score {z}) and came back down: {count} such {count|spike|spikes} in the run."
            ),
        },
    },
    "incident": {
        "title": "What happened",
        "text": {
            "text": "{story}",
        },
    },
    "level_shift": {
        "title": "Level shift (divergence)",
        "text": {
            "loss": (
                "The loss rose from {before} to {after} (×{factor}) from step {start_step} and "
                "stayed up until the end of the record: the run diverged, it did not spike."
            ),
            "grad_norm": (
                "The gradient norm rose from {before} to {after} (×{factor}) from step "
                "{start_step} and stayed up until the end of the record."
            ),
        },
    },
    "clipped_every_step": {
        "title": "Clipped on every step",
        "text": {
            "text": (
                "{share_pct} of the applied steps were clipped at {threshold} (the gradient "
                "norm's median was {median_norm}): the clipping no longer removes outliers, it "
                "sets the step size. The step size is the problem: lower the learning rate."
            ),
        },
    },
    "too_few_steps": {
        "title": "Too few steps to judge",
        "text": {
            "text": (
                "Only {steps} steps were recorded; the detectors need at least {needed} to judge "
                "a run, so nothing is said about its health."
            ),
        },
    },
}

CAUSES: dict[str, dict[str, str]] = {
    "saturating_activation": {
        "title": "saturating activations (sigmoid/tanh)",
        "text": "Their derivative is at most 0.25 (sigmoid) or 1 (tanh), and near 0 once a unit "
                "saturates; backpropagation multiplies one such factor per layer.",
    },
    "depth": {
        "title": "depth",
        "text": "Many layers in series multiply many per-layer factors: anything below or above 1 "
                "compounds geometrically.",
    },
    "small_init": {
        "title": "initial weights too small",
        "text": "Each layer shrinks the signal on the way forward and the gradient on the way "
                "back.",
    },
    "large_init": {
        "title": "initial weights too large",
        "text": "Each layer amplifies the signal: sigmoid/tanh units saturate, ReLU activations "
                "blow up.",
    },
    "high_learning_rate": {
        "title": "learning rate too high",
        "text": "Steps are large compared with the weights, so one update can overshoot into a "
                "bad region.",
    },
    "low_learning_rate": {
        "title": "learning rate too low",
        "text": "Updates are tiny compared with the weights, so the network barely moves.",
    },
    "recurrence": {
        "title": "recurrence over many time steps",
        "text": "A recurrent layer applies the same matrix at every step, so its gain is raised "
                "to the power of the sequence length.",
    },
    "missing_normalization": {
        "title": "no normalisation layers",
        "text": "Nothing re-centres and re-scales the activations, so scale errors accumulate "
                "with depth.",
    },
    "numerical_overflow": {
        "title": "numerical overflow",
        "text": "A value left the floating-point range (exp overflow, log of 0, division by ~0) "
                "and became Inf or NaN.",
    },
    "dying_relu": {
        "title": "dying ReLUs",
        "text": "A ReLU whose input is negative for every example outputs 0 and gets 0 gradient; "
                "it never recovers on its own.",
    },
    "bad_bias_init": {
        "title": "biases far from zero",
        "text": "Strongly negative (or positive) biases push units out of their working range "
                "from the first step.",
    },
    "outlier_batch": {
        "title": "an outlier batch",
        "text": "One unusual batch (mislabelled, unnormalised, extreme values) produced an "
                "unusually large loss or gradient.",
    },
}

REMEDIES: dict[str, dict[str, str]] = {
    "relu_family": {
        "title": "use a ReLU-family activation (with He init)",
        "text": "ReLU's derivative is exactly 1 for active units, so depth no longer multiplies "
                "the gradient by ≤ 0.25 per layer.",
        "snippet": (
            "# replace nn.Sigmoid()/nn.Tanh() between layers by nn.ReLU(), then re-initialise\n"
            "for m in model.modules():\n"
            "    if isinstance(m, nn.Linear):\n"
            "        nn.init.kaiming_normal_(m.weight, nonlinearity=\"relu\")\n"
            "        nn.init.zeros_(m.bias)"
        ),
    },
    "he_init": {
        "title": "He (Kaiming) initialisation",
        "text": "Weights with variance 2/fan_in keep the signal's scale constant through ReLU "
                "layers (He et al. 2015).",
        "snippet": (
            "for m in model.modules():\n"
            "    if isinstance(m, (nn.Linear, nn.Conv2d)):\n"
            "        nn.init.kaiming_normal_(m.weight, nonlinearity=\"relu\")  # std = sqrt(2/fan_in)\n"
            "        nn.init.zeros_(m.bias)"
        ),
    },
    "xavier_init": {
        "title": "Xavier (Glorot) initialisation",
        "text": "Weights with variance 2/(fan_in + fan_out), times the activation's gain, keep "
                "tanh and sigmoid units in their working range (Glorot & Bengio 2010).",
        "snippet": (
            "gain = nn.init.calculate_gain(\"tanh\")  # 5/3 for tanh, 1.0 for sigmoid\n"
            "for m in model.modules():\n"
            "    if isinstance(m, nn.Linear):\n"
            "        nn.init.xavier_normal_(m.weight, gain=gain)\n"
            "        nn.init.zeros_(m.bias)"
        ),
    },
    "orthogonal_init": {
        "title": "orthogonal initialisation",
        "text": "An orthogonal matrix preserves norms exactly, so repeated products (depth or "
                "time steps) neither shrink nor blow up the gradient (Saxe et al. 2014).",
        "snippet": (
            "for name, p in model.named_parameters():\n"
            "    if name.startswith(\"rnn.weight_hh\") or p.ndim == 2:\n"
            "        nn.init.orthogonal_(p)"
        ),
    },
    "batch_norm": {
        "title": "add normalisation layers",
        "text": "BatchNorm (or LayerNorm) before each activation re-centres and re-scales the "
                "signal at every layer (Ioffe & Szegedy 2015).",
        "snippet": (
            "nn.Sequential(\n"
            "    nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),  # normalise, then activate\n"
            "    nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),\n"
            ")"
        ),
    },
    "residual_connections": {
        "title": "add residual (skip) connections",
        "text": "An identity path around each block carries the gradient back unchanged (He et "
                "al. 2016).",
        "snippet": (
            "class Block(nn.Module):\n"
            "    def __init__(self, d):\n"
            "        super().__init__()\n"
            "        self.norm = nn.LayerNorm(d)\n"
            "        self.ff = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))\n"
            "\n"
            "    def forward(self, x):\n"
            "        return x + self.ff(self.norm(x))  # the identity path carries the gradient"
        ),
    },
    "gradient_clipping": {
        "title": "clip the gradient norm",
        "text": "Rescale the gradient when its norm exceeds a threshold, so one bad step cannot "
                "throw the weights away (Pascanu et al. 2013).",
        "snippet": (
            "loss.backward()\n"
            "gg.clip_grad_norm_(model.parameters(), max_norm=1.0)  # same API as torch.nn.utils\n"
            "optimizer.step()"
        ),
    },
    "lower_learning_rate": {
        "title": "lower the learning rate",
        "text": "Smaller steps stop the overshooting; try 10× lower first.",
        "snippet": (
            "for g in optimizer.param_groups:\n"
            "    g[\"lr\"] *= 0.1"
        ),
    },
    "raise_learning_rate": {
        "title": "raise the learning rate",
        "text": "Updates are negligible; try 10× higher (or an adaptive optimizer).",
        "snippet": (
            "for g in optimizer.param_groups:\n"
            "    g[\"lr\"] *= 10"
        ),
    },
    "lr_schedule": {
        "title": "warm the learning rate up",
        "text": "Start small and ramp up over the first steps, while the statistics the "
                "optimizer relies on settle.",
        "snippet": (
            "warmup = 500\n"
            "sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))\n"
            "# call sched.step() after every optimizer.step()"
        ),
    },
    "adaptive_optimizer": {
        "title": "use an adaptive optimizer (Adam)",
        "text": "Adam scales each parameter's step by its own gradient history, which makes it "
                "much less sensitive to the gradient's scale in each layer.",
        "snippet": "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)",
    },
    "gated_recurrence": {
        "title": "use a gated recurrent layer (GRU/LSTM)",
        "text": "Gates give the gradient an additive path through time, so it can survive many "
                "steps (Hochreiter & Schmidhuber 1997).",
        "snippet": (
            "self.rnn = nn.GRU(input_size, hidden_size, batch_first=True)  # drop-in for nn.RNN\n"
            "# nn.LSTM works too, but returns (h, c) as its state"
        ),
    },
    "weight_decay": {
        "title": "add weight decay",
        "text": "Keeps the weights from growing without bound over long training.",
        "snippet": "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)",
    },
    "skip_nonfinite_steps": {
        "title": "skip steps with NaN/Inf gradients",
        "text": "Do not apply an update whose gradients are not finite; the weights stay "
                "usable.",
        "snippet": (
            "loss.backward()\n"
            "if not gg.grad_stats(model.parameters()).nonfinite:  # one host sync per step\n"
            "    optimizer.step()\n"
            "optimizer.zero_grad()"
        ),
    },
    "spike_skipping": {
        "title": "skip steps whose gradient norm spikes",
        "text": "Drop an update when the gradient norm jumps far above its running median.",
        "snippet": (
            "norm = float(gg.grad_stats(model.parameters()).global_norm)\n"
            "if norm < 10 * running_median:\n"
            "    optimizer.step()"
        ),
    },
    "leaky_relu": {
        "title": "use LeakyReLU",
        "text": "A small negative slope keeps a gradient flowing through inactive units, so they "
                "can come back.",
        "snippet": "nn.LeakyReLU(0.01)  # instead of nn.ReLU()",
    },
    "stable_loss": {
        "title": "use a numerically stable loss",
        "text": "Work on logits with fused, log-sum-exp based losses instead of taking log of a "
                "probability yourself.",
        "snippet": (
            "loss = F.cross_entropy(logits, y)  # not F.nll_loss(torch.log(torch.softmax(logits, -1)), y)\n"
            "loss = F.binary_cross_entropy_with_logits(logits, t)  # not BCE on torch.sigmoid(logits)"
        ),
    },
}

NOTES: dict[str, str] = {
    "manual": "needs a change to your code; not tried automatically",
    "needs_optimizer": "acts through training; pass an optimizer to diagnose() to try it",
    "trial_limit": "not tried (over max_trials)",
    "failed": "could not run on this model",
    "not_applicable": "nothing in this model to change",
}

UI: dict[str, str] = {
    "report_title": "gradguard diagnosis",
    "healthy": "No problems found: the gradients flow well.",
    "findings": "Findings",
    "severity_info": "INFO",
    "severity_warning": "WARNING",
    "severity_error": "ERROR",
    "layers": "Layers",
    "no_layers": "the whole network (no single layer)",
    "more_layers": "… and {n} more",
    "causes": "Likely causes",
    "remedies": "Remedies",
    "how": "How",
    "evidence": "Evidence",
    "trials": "Remedies tried on a copy",
    "trials_intro": "Each remedy was applied to a fresh copy and run for the same steps with the same seed.",
    "col_remedy": "Remedy",
    "col_flow": "first/last grad",
    "col_time": "first/last time step",
    "col_loss": "loss after run",
    "col_left": "findings left",
    "col_effect": "effect",
    "col_finding": "Finding",
    "col_severity": "Severity",
    "baseline": "as it is (baseline)",
    "improves": "improves",
    "no_gain": "no gain",
    "not_tried": "not tried",
    "none": "none",
    "resolves": "resolves {codes}",
    "run_summary": "{mode}: {steps} {steps|step|steps} on {model} ({params} {params|parameter|parameters})",
    "run_summary_history": "{mode}: {steps} {steps|step|steps}, {tensors} {tensors|tensor|tensors} ({model})",
    "mode_train": "training run",
    "mode_examine": "examination at the current weights",
    "mode_history": "recorded run",
    "plot_layers": "Gradient norm per layer (median over steps)",
    "plot_heatmap": "Gradient norm, layer × step",
    "plot_loss": "Loss",
    "plot_trials": "Loss with each remedy",
    "axis_layer": "layer (input → output)",
    "axis_step": "step",
    "axis_norm": "gradient norm",
    "axis_loss": "loss",
    "html_plots": "Plots",
    "html_run": "Run",
    "html_no_history": "No per-step history to plot.",
    "tried_effect": "Tried on a copy: {remedy}: {effect}",
    "demo_title": "gradguard demo: a deep sigmoid network that cannot learn",
    "demo_intro": "A {depth}-layer sigmoid MLP with the old U[±1/√fan_in] initialisation, trained with SGD on scikit-learn's handwritten digits.",
    "demo_diagnosing": "Diagnosing",
    "demo_trying": "Trying remedies",
    "demo_training": "Training the best remedy",
    "demo_best": "Best remedy: {remedy}",
    "demo_accuracy": "Test accuracy after {epochs} {epochs|epoch|epochs}: {acc} with the remedy \u201c{remedy}\u201d, against {base} for the network as it was.",
    "demo_no_remedy": "No remedy improved on the baseline.",
    "wrote": "Wrote {path}",
    "report_from": "Findings from {path} ({steps} {steps|step|steps})",
    "factory_loaded": "Model from {spec}",
}

#: the pieces of a recorded run's story (gradguard.recorded): one incident is
#: "<where>: <what>, <what>, ...; <how it ended>"
STORY: dict[str, str] = {
    "unaffected": "the loss was not affected",
    "lr_jump": "LR raised ×{factor} by the training loop",
    "step": "step {a}",
    "steps": "steps {a}–{b}",
    "loss": "loss ×{factor}",
    "nonfinite": "{n} step(s) with non-finite gradients or loss",
    "nonfinite_layer": "{n} step(s) with non-finite gradients or loss (first in {layer})",
    "skipped": "{n} step(s) skipped",
    "backoff": "LR ×{factor} for {steps} steps",
    "rollback": "rolled back {n}× (to step {to})",
    "quiet": "nothing skipped",
    "recovered": "back to the pre-spike level by step {step}",
    "recovered_no_loss": "training resumed at step {step}",
    "not_recovered": "not recovered",
    "nothing": "nothing to report",
}
# -- added with the doctor package (issue 10) -------------------------------------------------------
FINDINGS.update({
    "loss_divergence": {
        "title": "Loss diverging",
        "text": {
            "text": (
                "The loss climbed from {before} to {after} (×{factor}) from step {first_step} on "
                "and did not come back down: training is moving away from a solution."
            ),
            "recovered": (
                "The loss climbed from {before} to {after} (×{factor}) at step {first_step} and "
                "stayed up for {length} steps before it came back down."
            ),
        },
    },
    "loss_scale": {
        "title": "Loss summed, not averaged",
        "text": {
            "text": (
                "A whole batch gives {batch_ratio} times the loss of half of it: the loss is "
                "summed over the batch, so its gradient and the effective "
                "learning rate grow with the batch size, and this run is unstable."
            ),
        },
    },
})

CAUSES.update({
    "half_precision": {
        "title": "half precision",
        "text": "float16/bfloat16 has a small range (fp16 overflows past 65504) or few bits: "
                "logits and losses computed in it overflow or round away.",
    },
    "unscaled_data": {
        "title": "unscaled data",
        "text": "Inputs or targets far from unit scale make the first layer's gradient (or the "
                "loss) huge next to the others, so no single learning rate fits.",
    },
    "summed_loss": {
        "title": "loss summed over the batch",
        "text": "reduction='sum' scales the gradient with the batch (and sequence) size.",
    },
    "closed_forget_gate": {
        "title": "closed forget gate",
        "text": "An LSTM whose forget-gate bias starts negative forgets its state at every step, "
                "so no gradient flows back through time.",
    },
})

REMEDIES.update({
    "layer_norm": {
        "title": "add LayerNorm",
        "text": "Normalise each example's features (LayerNorm or RMSNorm): it suits sequences, "
                "recurrent nets and transformers, where batch statistics do not.",
        "snippet": (
            "self.norm = nn.LayerNorm(hidden)\n"
            "out, h = self.rnn(x, h)\n"
            "out = self.norm(out)"
        ),
    },
    "pre_ln": {
        "title": "Pre-LN transformer layers",
        "text": "Put each LayerNorm before its attention/MLP sublayer (Pre-LN): the residual path "
                "stays an identity and the gradient reaches the first layers at any depth.",
        "snippet": "nn.TransformerEncoderLayer(d_model, nhead, norm_first=True)",
    },
    "forget_gate_bias": {
        "title": "open the LSTM forget gate (bias +1)",
        "text": "Start the forget-gate bias at +1 so that the cell keeps its state and the "
                "gradient flows back through time (Gers et al. 2000; Jozefowicz et al. 2015).",
        "snippet": (
            "h = lstm.hidden_size\n"
            "with torch.no_grad():\n"
            "    lstm.bias_ih_l0[h:2 * h].fill_(1.0)\n"
            "    lstm.bias_hh_l0[h:2 * h].zero_()"
        ),
    },
    "fp32_logits": {
        "title": "logits and loss in float32",
        "text": "Compute the output layer and the loss in float32 (keep the rest in half "
                "precision): that is where the values are largest.",
        "snippet": (
            "logits = self.head(x.float())        # head kept in float32: model.head.float()\n"
            "loss = F.cross_entropy(logits.float(), y)"
        ),
    },
    "standardize_data": {
        "title": "standardise the data",
        "text": "Scale every input feature (and regression targets) to mean 0 and standard "
                "deviation 1, with statistics from the training set.",
        "snippet": (
            "mu, sd = X_train.mean(0), X_train.std(0)\n"
            "X_train, X_test = (X_train - mu) / sd, (X_test - mu) / sd\n"
            "# regression: y = (y - y_mu) / y_sd, predictions * y_sd + y_mu"
        ),
    },
    "mean_reduction": {
        "title": "average the loss (reduction='mean')",
        "text": "Average the loss over the batch (and tokens) instead of summing it, so that its "
                "gradient does not grow with the batch size.",
        "snippet": "loss = F.cross_entropy(logits, y, reduction='mean')",
    },
})

NOTES.update({
    "time_budget": "not tried (max_seconds reached)",
})

UI.update({
    "worse": "worse",
    "prescription": "Prescription: {remedy} — the loss ended at {rel} of the untreated run's.",
    "lr_factor": "learning rate ×{factor}",
})
