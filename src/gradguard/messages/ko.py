"""한국어 텍스트: 모든 finding·원인·처방·시도 메모 코드, 그리고 리포트 자체의 문구.

``{중괄호}`` 자리는 :func:`gradguard.messages.finding_text` 가 finding의 근거(evidence) 숫자로
채웁니다. 구조와 키는 ``en.py`` 와 똑같아야 하며, 테스트가 이를 확인합니다.
"""

FINDINGS: dict[str, dict[str, object]] = {
    "vanishing_gradients": {
        "title": "기울기 소실 (vanishing gradients)",
        "text": {
            "depth": (
                "입력 쪽으로 역전파될수록 기울기가 점점 작아지고 있습니다. 첫 레이어"
                "({first_layer})가 받는 기울기는 가장 잘 학습되는 뒤쪽 레이어의 {ratio}배에 "
                "불과하고, {depth}개 레이어를 지나는 동안 레이어마다 약 ×{decay}씩 줄어듭니다. "
                "{n_layers}개 레이어가 10배 이상 작은 기울기를 받고 있어서 사실상 학습이 "
                "거의 되지 않습니다."
            ),
            "time": (
                "{first_layer} 안에서 시간 축을 따라 기울기가 사라지고 있습니다. "
                "{time_steps}개 타임스텝 중 첫 스텝이 받는 기울기는 마지막 스텝의 {ratio}배이고, "
                "한 스텝마다 약 ×{decay}씩 줄어듭니다. 이 상태로는 몇 스텝 이전의 정보에 "
                "의존하는 패턴을 배울 수 없습니다."
            ),
        },
    },
    "exploding_gradients": {
        "title": "기울기 폭주 (exploding gradients)",
        "text": {
            "depth": (
                "입력 쪽으로 역전파될수록 기울기가 커지고 있습니다. 첫 레이어의 기울기가 "
                "뒤쪽에서 가장 작은 레이어의 {ratio}배로, 레이어마다 약 ×{growth}씩 불어납니다. "
                "평범한 학습률로도 한 번의 업데이트가 앞쪽 레이어를 엉뚱한 곳으로 날려 버립니다."
            ),
            "weights": (
                "기울기가 해당 가중치 자체보다 {rel_grad}배나 큽니다(시작 가중치 기준, 레이어 "
                "중앙값). 이러면 SGD 한 스텝이 가중치를 조금 고치는 게 아니라 통째로 갈아엎게 "
                "됩니다."
            ),
            "time": (
                "{first_layer} 안에서 시간 축을 따라 기울기가 불어나고 있습니다. "
                "{time_steps}개 타임스텝 중 첫 스텝이 받는 기울기가 마지막 스텝의 {ratio}배로, "
                "한 스텝마다 약 ×{growth_step}씩 커집니다. 시퀀스가 길어지거나 가중치가 조금만 "
                "더 커져도 오버플로가 납니다."
            ),
            "steps": (
                "학습하는 동안 전체 기울기 노름이 약 {early_norm}에서 {peak_norm}까지 "
                "치솟았고(×{growth}), 끝까지 처음보다 ×{sustained} 높은 수준에 머물렀습니다."
            ),
        },
    },
    "nonfinite_gradients": {
        "title": "기울기에 NaN/Inf 발생",
        "text": {
            "text": (
                "손실은 아직 유한한데 {first_step}번째 스텝에서 기울기가 NaN이나 Inf가 "
                "되었습니다(전체 {rows}스텝 중 {steps}스텝). {n_layers}개 레이어가 영향을 받았고, "
                "역전파 중에 처음 만난 곳은 그중 가장 깊은 레이어인 {origin}입니다."
            ),
        },
    },
    "nonfinite_loss": {
        "title": "손실이 NaN/Inf",
        "text": {
            "loss_fn": (
                "모델 출력은 멀쩡한데 첫 스텝부터 손실이 NaN이나 Inf입니다. 손실 함수 자체에서 "
                "수치가 터지고 있다는 뜻입니다(log(0), 큰 값의 exp, 0에 가까운 값으로 나누기 등)."
            ),
            "start": (
                "첫 스텝부터 손실이 NaN이나 Inf이고, 순전파 단계에서 이미 {origin}의 출력이 "
                "유한하지 않았습니다."
            ),
            "training": (
                "{first_step}스텝 동안 멀쩡하던 손실이 {first_step}번째 스텝에서 NaN이나 Inf가 "
                "되었습니다(마지막 정상 손실 {last_finite_loss}). 그 전에 기울기 노름이 이미 "
                "×{growth_before} 커져 있었고, 출력이 처음으로 깨진 레이어는 {origin}입니다."
            ),
        },
    },
    "saturated_activations": {
        "title": "활성화 함수 포화 (saturation)",
        "text": {
            "text": (
                "{ops} 유닛이 출력 범위의 끝에 붙어 버렸습니다. 도함수가 최댓값의 5%도 안 되는 "
                "구간으로, {n_layers}개 레이어에서 출력의 최대 {worst_pct}(평균 {mean_pct})가 이 "
                "상태입니다. 포화된 유닛은 기울기를 거의 뒤로 전달하지 못합니다."
            ),
        },
    },
    "dead_units": {
        "title": "죽은 ReLU 유닛 (dying ReLU)",
        "text": {
            "init": (
                "{n_layers}개 레이어에서 ReLU 유닛의 최대 {worst_pct}(평균 {mean_pct})가 샘플링한 "
                "입력 중 1%도 안 되는 곳에서만 켜졌습니다. 죽은 유닛은 0만 출력하고 기울기도 "
                "0이라서 스스로 되살아나지 못합니다."
            ),
            "training": (
                "학습 도중에 ReLU 유닛이 죽었습니다. 마지막 몇 스텝 동안 {n_layers}개 레이어에서 "
                "유닛의 최대 {worst_pct}(평균 {mean_pct})가 샘플의 1%도 안 되는 곳에서만 켜졌고, "
                "처음보다 훨씬 많아졌습니다. 큰 업데이트가 이 유닛들의 입력을 거의 모든 샘플에서 "
                "음수로 밀어 버린 것입니다."
            ),
        },
    },
    "activation_scale_drift": {
        "title": "깊이에 따른 활성값 스케일 변화",
        "text": {
            "shrinks": (
                "레이어를 지날 때마다 활성값이 기하급수적으로 작아집니다. 출력 스케일(RMS)이 "
                "{depth}개 레이어에 걸쳐 {first_rms}에서 {last_rms} 수준까지, 레이어마다 약 "
                "×{factor}씩 줄어듭니다. 이 활성화 함수에 비해 초기 가중치가 너무 작은 것이고, 역전파되는 "
                "기울기도 똑같이 줄어듭니다."
            ),
            "grows": (
                "레이어를 지날 때마다 활성값이 기하급수적으로 커집니다. 출력 스케일(RMS)이 "
                "{depth}개 레이어에 걸쳐 {first_rms}에서 {last_rms} 수준까지, 레이어마다 약 "
                "×{factor}씩 커집니다. 이 활성화 함수에 비해 초기 가중치가 너무 큽니다."
            ),
        },
    },
    "learning_rate_too_high": {
        "title": "학습률이 너무 높음",
        "text": {
            "text": (
                "한 스텝마다 가중치가 자기 노름의 {update_ratio}만큼 바뀝니다(중앙값, 최대 "
                "{max_update_ratio}). 건강한 학습에서는 보통 0.001 안팎인데, 이렇게 크게 움직이고도 "
                "손실은 나아지지 않았습니다(처음 {loss_first}, 마지막 {loss_last})."
            ),
            "diverged": (
                "한 스텝마다 가중치가 자기 노름의 {update_ratio}만큼 바뀝니다(중앙값, 최대 "
                "{max_update_ratio}). 건강한 학습에서는 보통 0.001 안팎인데, 결국 학습이 NaN/Inf로 "
                "발산했습니다."
            ),
        },
    },
    "training_stalled": {
        "title": "학습 정체",
        "text": {
            "text": (
                "손실이 거의 그대로이고({loss_first} → {loss_last}) 업데이트도 무시할 만큼 "
                "작습니다. 한 스텝에 가중치가 자기 노름의 {update_ratio}만큼밖에 움직이지 "
                "않습니다(전체 중앙값)."
            ),
        },
    },
    "loss_spike": {
        "title": "손실 스파이크",
        "text": {
            "loss": (
                "{first_step}번째 스텝에서 손실이 최근 중앙값보다 ×{ratio} 튀었다가(robust z-score "
                "{z}) 다시 내려왔습니다. 이런 스파이크가 모두 {count}번 있었습니다."
            ),
            "grad_norm": (
                "{first_step}번째 스텝에서 기울기 노름이 최근 중앙값보다 ×{ratio} 튀었다가"
                "(robust z-score {z}) 다시 내려왔습니다. 이런 스파이크가 모두 {count}번 "
                "있었습니다."
            ),
        },
    },
    "incident": {
        "title": "무슨 일이 있었나",
        "text": {
            "text": "{story}",
        },
    },
    "level_shift": {
        "title": "수준 이동(발산)",
        "text": {
            "loss": (
                "손실이 {start_step}번째 스텝부터 {before}에서 {after}(×{factor})로 올라 기록이 끝날 "
                "때까지 내려오지 않았습니다. 일시적인 스파이크가 아니라 학습이 발산했습니다."
            ),
            "grad_norm": (
                "기울기 노름이 {start_step}번째 스텝부터 {before}에서 {after}(×{factor})로 올라 "
                "기록이 끝날 때까지 내려오지 않았습니다."
            ),
        },
    },
    "clipped_every_step": {
        "title": "매 스텝 클리핑됨",
        "text": {
            "text": (
                "적용된 스텝의 {share_pct}가 {threshold}에서 클리핑되었습니다(기울기 노름의 "
                "중앙값 {median_norm}). 클리핑이 더 이상 이상치를 잘라내는 것이 아니라 스텝 크기를 "
                "정하고 있습니다. 문제는 스텝 크기입니다. 학습률을 낮추세요."
            ),
        },
    },
    "too_few_steps": {
        "title": "판단하기에 스텝이 너무 적음",
        "text": {
            "text": (
                "기록된 스텝이 {steps}개뿐입니다. 탐지기가 학습을 판단하려면 최소 {needed}개가 "
                "필요하므로 건강 상태에 대해서는 아무것도 말하지 않습니다."
            ),
        },
    },
}

CAUSES: dict[str, dict[str, str]] = {
    "saturating_activation": {
        "title": "포화형 활성화 함수 (sigmoid/tanh)",
        "text": "도함수가 최대 0.25(sigmoid)나 1(tanh)이고, 포화되면 거의 0이 됩니다. 역전파는 "
                "레이어마다 이 값을 하나씩 곱합니다.",
    },
    "depth": {
        "title": "네트워크 깊이",
        "text": "레이어가 많을수록 레이어별 배율이 많이 곱해지므로, 1보다 조금만 작거나 커도 "
                "기하급수적으로 쌓입니다.",
    },
    "small_init": {
        "title": "너무 작은 초기 가중치",
        "text": "레이어마다 순전파 신호와 역전파 기울기가 함께 줄어듭니다.",
    },
    "large_init": {
        "title": "너무 큰 초기 가중치",
        "text": "레이어마다 신호가 증폭되어 sigmoid/tanh는 포화되고 ReLU 활성값은 폭주합니다.",
    },
    "high_learning_rate": {
        "title": "너무 높은 학습률",
        "text": "가중치에 비해 스텝이 커서 한 번의 업데이트로 나쁜 영역까지 넘어가 버릴 수 "
                "있습니다.",
    },
    "low_learning_rate": {
        "title": "너무 낮은 학습률",
        "text": "가중치에 비해 업데이트가 너무 작아서 네트워크가 거의 움직이지 않습니다.",
    },
    "recurrence": {
        "title": "긴 시퀀스에 걸친 순환 구조",
        "text": "순환 레이어는 매 타임스텝 같은 행렬을 곱하므로, 그 배율이 시퀀스 길이만큼 "
                "거듭제곱됩니다.",
    },
    "missing_normalization": {
        "title": "정규화 레이어 없음",
        "text": "활성값을 다시 중심에 맞추고 스케일을 맞춰 주는 층이 없어서, 스케일 오차가 깊이를 "
                "따라 누적됩니다.",
    },
    "numerical_overflow": {
        "title": "수치 오버플로",
        "text": "어떤 값이 부동소수점 범위를 벗어나(exp 오버플로, log(0), 0에 가까운 값으로 나누기) "
                "Inf나 NaN이 되었습니다.",
    },
    "dying_relu": {
        "title": "죽은 ReLU",
        "text": "모든 샘플에서 입력이 음수인 ReLU는 0만 출력하고 기울기도 0이라, 스스로는 "
                "되살아나지 못합니다.",
    },
    "bad_bias_init": {
        "title": "0에서 크게 벗어난 편향(bias)",
        "text": "편향이 크게 음수(또는 양수)로 시작하면 첫 스텝부터 유닛이 제대로 동작하는 범위를 "
                "벗어납니다.",
    },
    "outlier_batch": {
        "title": "이상치 배치",
        "text": "특이한 배치 하나(잘못된 레이블, 정규화 안 된 입력, 극단값)가 유난히 큰 손실이나 "
                "기울기를 만들었습니다.",
    },
}

REMEDIES: dict[str, dict[str, str]] = {
    "relu_family": {
        "title": "ReLU 계열 활성화 함수로 교체 (He 초기화와 함께)",
        "text": "ReLU는 활성화된 유닛에서 도함수가 정확히 1이라, 레이어마다 0.25 이하를 곱하던 "
                "문제가 사라집니다.",
        "snippet": (
            "# 레이어 사이의 nn.Sigmoid()/nn.Tanh()를 nn.ReLU()로 바꾼 뒤 다시 초기화합니다\n"
            "for m in model.modules():\n"
            "    if isinstance(m, nn.Linear):\n"
            "        nn.init.kaiming_normal_(m.weight, nonlinearity=\"relu\")\n"
            "        nn.init.zeros_(m.bias)"
        ),
    },
    "he_init": {
        "title": "He(Kaiming) 초기화",
        "text": "분산이 2/fan_in인 가중치는 ReLU 레이어를 지나도 신호의 스케일을 일정하게 "
                "유지합니다(He et al. 2015).",
        "snippet": (
            "for m in model.modules():\n"
            "    if isinstance(m, (nn.Linear, nn.Conv2d)):\n"
            "        nn.init.kaiming_normal_(m.weight, nonlinearity=\"relu\")  # 표준편차 = sqrt(2/fan_in)\n"
            "        nn.init.zeros_(m.bias)"
        ),
    },
    "xavier_init": {
        "title": "Xavier(Glorot) 초기화",
        "text": "분산이 2/(fan_in + fan_out)에 활성화 함수의 gain을 곱한 가중치는 tanh와 sigmoid "
                "유닛을 제대로 동작하는 범위 안에 둡니다(Glorot & Bengio 2010).",
        "snippet": (
            "gain = nn.init.calculate_gain(\"tanh\")  # tanh는 5/3, sigmoid는 1.0\n"
            "for m in model.modules():\n"
            "    if isinstance(m, nn.Linear):\n"
            "        nn.init.xavier_normal_(m.weight, gain=gain)\n"
            "        nn.init.zeros_(m.bias)"
        ),
    },
    "orthogonal_init": {
        "title": "직교(orthogonal) 초기화",
        "text": "직교 행렬은 노름을 그대로 보존하므로, 같은 행렬을 여러 번 곱해도(깊이든 "
                "타임스텝이든) 기울기가 줄거나 폭주하지 않습니다(Saxe et al. 2014).",
        "snippet": (
            "for name, p in model.named_parameters():\n"
            "    if name.startswith(\"rnn.weight_hh\") or p.ndim == 2:\n"
            "        nn.init.orthogonal_(p)"
        ),
    },
    "batch_norm": {
        "title": "정규화 레이어 추가",
        "text": "활성화 함수 앞에 BatchNorm(또는 LayerNorm)을 두면 레이어마다 신호의 중심과 "
                "스케일이 다시 맞춰집니다(Ioffe & Szegedy 2015).",
        "snippet": (
            "nn.Sequential(\n"
            "    nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),  # 정규화한 다음 활성화\n"
            "    nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),\n"
            ")"
        ),
    },
    "residual_connections": {
        "title": "잔차 연결(skip connection) 추가",
        "text": "블록을 건너뛰는 항등 경로가 기울기를 줄이지 않고 그대로 전달합니다(He et al. "
                "2016).",
        "snippet": (
            "class Block(nn.Module):\n"
            "    def __init__(self, d):\n"
            "        super().__init__()\n"
            "        self.norm = nn.LayerNorm(d)\n"
            "        self.ff = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))\n"
            "\n"
            "    def forward(self, x):\n"
            "        return x + self.ff(self.norm(x))  # 항등 경로로 기울기가 흐릅니다"
        ),
    },
    "gradient_clipping": {
        "title": "기울기 노름 클리핑",
        "text": "기울기 노름이 임계값을 넘으면 크기를 줄여서, 나쁜 스텝 하나가 가중치를 날려 "
                "버리지 못하게 합니다(Pascanu et al. 2013).",
        "snippet": (
            "loss.backward()\n"
            "gg.clip_grad_norm_(model.parameters(), max_norm=1.0)  # torch.nn.utils와 같은 API\n"
            "optimizer.step()"
        ),
    },
    "lower_learning_rate": {
        "title": "학습률 낮추기",
        "text": "스텝을 줄이면 목표를 지나쳐 버리는 일이 멈춥니다. 우선 10배 낮춰 보세요.",
        "snippet": (
            "for g in optimizer.param_groups:\n"
            "    g[\"lr\"] *= 0.1"
        ),
    },
    "raise_learning_rate": {
        "title": "학습률 높이기",
        "text": "업데이트가 무시할 만큼 작습니다. 10배 높여 보거나 적응형 옵티마이저를 써 보세요.",
        "snippet": (
            "for g in optimizer.param_groups:\n"
            "    g[\"lr\"] *= 10"
        ),
    },
    "lr_schedule": {
        "title": "학습률 워밍업",
        "text": "처음에는 작게 시작해서 옵티마이저가 쓰는 통계가 자리 잡을 때까지 천천히 "
                "올립니다.",
        "snippet": (
            "warmup = 500\n"
            "sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))\n"
            "# optimizer.step() 다음마다 sched.step()을 호출합니다"
        ),
    },
    "adaptive_optimizer": {
        "title": "적응형 옵티마이저(Adam) 사용",
        "text": "Adam은 파라미터마다 자기 기울기 이력으로 스텝 크기를 조절하므로, 레이어별 "
                "기울기 스케일 차이에 훨씬 덜 민감합니다.",
        "snippet": "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)",
    },
    "gated_recurrence": {
        "title": "게이트가 있는 순환 레이어(GRU/LSTM) 사용",
        "text": "게이트가 시간 축으로 덧셈 경로를 만들어 주기 때문에 기울기가 여러 스텝을 "
                "버틸 수 있습니다(Hochreiter & Schmidhuber 1997).",
        "snippet": (
            "self.rnn = nn.GRU(input_size, hidden_size, batch_first=True)  # nn.RNN 자리에 그대로\n"
            "# nn.LSTM도 되지만 상태를 (h, c) 튜플로 돌려줍니다"
        ),
    },
    "weight_decay": {
        "title": "weight decay 추가",
        "text": "오래 학습하는 동안 가중치가 한없이 커지지 않게 잡아 줍니다.",
        "snippet": "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)",
    },
    "skip_nonfinite_steps": {
        "title": "NaN/Inf 기울기 스텝 건너뛰기",
        "text": "기울기가 유한하지 않은 업데이트는 적용하지 않습니다. 가중치는 멀쩡하게 "
                "남습니다.",
        "snippet": (
            "loss.backward()\n"
            "if not gg.grad_stats(model.parameters()).nonfinite:  # 스텝마다 호스트 동기화 1회\n"
            "    optimizer.step()\n"
            "optimizer.zero_grad()"
        ),
    },
    "spike_skipping": {
        "title": "기울기 노름이 튀는 스텝 건너뛰기",
        "text": "기울기 노름이 최근 중앙값보다 훨씬 크게 튀면 그 업데이트는 버립니다.",
        "snippet": (
            "norm = float(gg.grad_stats(model.parameters()).global_norm)\n"
            "if norm < 10 * running_median:\n"
            "    optimizer.step()"
        ),
    },
    "leaky_relu": {
        "title": "LeakyReLU 사용",
        "text": "음수 쪽에 작은 기울기를 남겨 두면 꺼진 유닛에도 기울기가 흘러서 다시 살아날 "
                "수 있습니다.",
        "snippet": "nn.LeakyReLU(0.01)  # nn.ReLU() 대신",
    },
    "stable_loss": {
        "title": "수치적으로 안정적인 손실 함수 사용",
        "text": "확률에 직접 log를 씌우지 말고, 로짓을 받아 log-sum-exp로 계산하는 손실 함수를 "
                "쓰세요.",
        "snippet": (
            "loss = F.cross_entropy(logits, y)  # F.nll_loss(torch.log(torch.softmax(logits, -1)), y) 대신\n"
            "loss = F.binary_cross_entropy_with_logits(logits, t)  # torch.sigmoid(logits)에 BCE 대신"
        ),
    },
}

NOTES: dict[str, str] = {
    "manual": "코드를 직접 고쳐야 해서 자동으로 시도하지 않았습니다",
    "needs_optimizer": "학습을 통해 작용하는 처방입니다. diagnose()에 옵티마이저를 넘기면 시도합니다",
    "trial_limit": "시도하지 않음 (max_trials 초과)",
    "failed": "이 모델에서는 실행할 수 없었습니다",
    "not_applicable": "이 모델에는 바꿀 부분이 없습니다",
}

UI: dict[str, str] = {
    "report_title": "gradguard 진단",
    "healthy": "문제를 찾지 못했습니다. 기울기가 잘 흐르고 있습니다.",
    "findings": "진단 결과",
    "severity_info": "참고",
    "severity_warning": "경고",
    "severity_error": "오류",
    "layers": "레이어",
    "no_layers": "네트워크 전체 (특정 레이어 아님)",
    "more_layers": "… 외 {n}개",
    "causes": "추정 원인",
    "remedies": "처방",
    "how": "적용 방법",
    "evidence": "근거",
    "trials": "복사본에 시도해 본 처방",
    "trials_intro": "처방마다 새 복사본에 적용하고, 같은 시드로 같은 스텝만큼 다시 돌려 보았습니다.",
    "col_remedy": "처방",
    "col_flow": "첫/끝 레이어 기울기 비",
    "col_time": "첫/끝 타임스텝 비",
    "col_loss": "실행 후 손실",
    "col_left": "남은 문제",
    "col_effect": "효과",
    "col_finding": "진단",
    "col_severity": "심각도",
    "baseline": "현재 상태 (기준)",
    "improves": "개선됨",
    "no_gain": "효과 없음",
    "not_tried": "시도 안 함",
    "none": "없음",
    "resolves": "{codes} 해결",
    "run_summary": "{mode}: {model}({params}개 파라미터)에서 {steps}스텝",
    "run_summary_history": "{mode}: {steps}스텝, 텐서 {tensors}개 ({model})",
    "mode_train": "학습 실행",
    "mode_examine": "현재 가중치 검사",
    "mode_history": "기록된 학습",
    "plot_layers": "레이어별 기울기 노름 (스텝 중앙값)",
    "plot_heatmap": "기울기 노름, 레이어 × 스텝",
    "plot_loss": "손실",
    "plot_trials": "처방별 손실 곡선",
    "axis_layer": "레이어 (입력 → 출력)",
    "axis_step": "스텝",
    "axis_norm": "기울기 노름",
    "axis_loss": "손실",
    "html_plots": "그래프",
    "html_run": "실행 정보",
    "html_no_history": "그릴 스텝별 기록이 없습니다.",
    "tried_effect": "복사본에서 시도: {remedy}: {effect}",
    "demo_title": "gradguard 데모: 학습이 안 되는 깊은 sigmoid 네트워크",
    "demo_intro": "예전 방식의 U[±1/√fan_in] 초기화를 쓴 {depth}층 sigmoid MLP를 scikit-learn 손글씨 숫자 데이터에 SGD로 학습합니다.",
    "demo_diagnosing": "진단 중",
    "demo_trying": "처방 시도 중",
    "demo_training": "가장 좋은 처방으로 학습 중",
    "demo_best": "가장 효과가 큰 처방: {remedy}",
    "demo_accuracy": "{epochs} 에포크 학습 후 테스트 정확도: {remedy} 적용 시 {acc}, 원래 네트워크는 {base}.",
    "demo_no_remedy": "기준보다 나아진 처방이 없습니다.",
    "wrote": "{path} 저장함",
    "report_from": "{path}의 진단 결과 ({steps}스텝)",
    "factory_loaded": "{spec}에서 모델을 불러왔습니다",
}

#: 기록된 학습 이야기의 조각 (gradguard.recorded)
STORY: dict[str, str] = {
    "unaffected": "손실에는 영향이 없었음",
    "lr_jump": "학습 루프가 학습률을 ×{factor} 올림",
    "step": "{a}번째 스텝",
    "steps": "{a}–{b}번째 스텝",
    "loss": "손실 ×{factor}",
    "nonfinite": "기울기나 손실이 유한하지 않은 스텝 {n}개",
    "nonfinite_layer": "기울기나 손실이 유한하지 않은 스텝 {n}개(처음은 {layer})",
    "skipped": "{n}스텝 건너뜀",
    "backoff": "{steps}스텝 동안 학습률 ×{factor}",
    "rollback": "{n}번 롤백({to}번째 스텝으로)",
    "quiet": "건너뛴 스텝 없음",
    "recovered": "{step}번째 스텝까지 스파이크 이전 수준으로 회복",
    "recovered_no_loss": "{step}번째 스텝에서 학습 재개",
    "not_recovered": "회복되지 않음",
    "nothing": "보고할 것 없음",
}
# -- 닥터 패키지와 함께 추가 (issue 10) ---------------------------------------------------------------
from gradguard.messages import en as _en  # noqa: E402  (snippets that are code only)

FINDINGS.update({
    "loss_divergence": {
        "title": "손실 발산",
        "text": {
            "text": (
                "손실이 {first_step} 스텝부터 {before}에서 {after}(×{factor})로 올라간 뒤 "
                "내려오지 않았습니다. 학습이 해에서 멀어지고 있습니다."
            ),
            "recovered": (
                "손실이 {first_step} 스텝에서 {before}에서 {after}(×{factor})로 올라가 "
                "{length} 스텝 동안 머문 뒤 내려왔습니다."
            ),
        },
    },
    "loss_scale": {
        "title": "평균이 아니라 합으로 계산된 손실",
        "text": {
            "text": (
                "배치 전체의 손실이 절반 배치의 {batch_ratio}배입니다. 손실이 배치에 대해 "
                "합산되어 기울기와 실질 학습률이 배치 크기에 비례해 "
                "커지며, 이 실행은 불안정합니다."
            ),
        },
    },
})

CAUSES.update({
    "half_precision": {
        "title": "반정밀도",
        "text": "float16/bfloat16은 범위(fp16은 65504를 넘으면 오버플로)나 정밀도가 작아, "
                "그 안에서 계산한 로짓과 손실이 넘치거나 반올림으로 사라집니다.",
    },
    "unscaled_data": {
        "title": "스케일이 맞지 않은 데이터",
        "text": "입력이나 타깃이 단위 스케일에서 멀면 첫 층의 기울기(또는 손실)가 다른 "
                "층보다 훨씬 커져서 하나의 학습률로 맞출 수 없습니다.",
    },
    "summed_loss": {
        "title": "배치에 대해 합산된 손실",
        "text": "reduction='sum'은 기울기를 배치(와 시퀀스) 크기에 비례해 키웁니다.",
    },
    "closed_forget_gate": {
        "title": "닫힌 망각 게이트",
        "text": "망각 게이트 바이어스가 음수로 시작한 LSTM은 매 스텝 상태를 잊어버려서 "
                "시간을 거슬러 기울기가 흐르지 않습니다.",
    },
})

REMEDIES.update({
    "layer_norm": {
        "title": "LayerNorm 추가",
        "text": "각 예제의 특성을 정규화합니다(LayerNorm 또는 RMSNorm). 배치 통계가 맞지 않는 "
                "시퀀스, 순환 신경망, 트랜스포머에 알맞습니다.",
        "snippet": (
            "self.norm = nn.LayerNorm(hidden)\n"
            "out, h = self.rnn(x, h)\n"
            "out = self.norm(out)"
        ),
    },
    "pre_ln": {
        "title": "Pre-LN 트랜스포머 층",
        "text": "각 LayerNorm을 어텐션/MLP 하위 층 앞에 둡니다(Pre-LN). 잔차 경로가 항등으로 "
                "남아 깊이와 관계없이 기울기가 첫 층까지 닿습니다.",
        "snippet": "nn.TransformerEncoderLayer(d_model, nhead, norm_first=True)",
    },
    "forget_gate_bias": {
        "title": "LSTM 망각 게이트 열기 (바이어스 +1)",
        "text": "망각 게이트 바이어스를 +1로 시작해 셀이 상태를 유지하고 기울기가 시간을 "
                "거슬러 흐르게 합니다(Gers 외 2000; Jozefowicz 외 2015).",
        "snippet": _en.REMEDIES["forget_gate_bias"]["snippet"],  # code reads the same
    },
    "fp32_logits": {
        "title": "로짓과 손실을 float32로",
        "text": "출력 층과 손실은 float32로 계산합니다(나머지는 반정밀도 유지). 값이 가장 큰 "
                "곳이 바로 거기입니다.",
        "snippet": (
            "logits = self.head(x.float())        # 헤드는 float32로: model.head.float()\n"
            "loss = F.cross_entropy(logits.float(), y)"
        ),
    },
    "standardize_data": {
        "title": "데이터 표준화",
        "text": "학습 세트의 통계로 모든 입력 특성(과 회귀 타깃)을 평균 0, 표준편차 1로 "
                "맞춥니다.",
        "snippet": (
            "mu, sd = X_train.mean(0), X_train.std(0)\n"
            "X_train, X_test = (X_train - mu) / sd, (X_test - mu) / sd\n"
            "# 회귀: y = (y - y_mu) / y_sd, 예측값 * y_sd + y_mu"
        ),
    },
    "mean_reduction": {
        "title": "손실 평균 (reduction='mean')",
        "text": "손실을 배치(와 토큰)에 대해 합하지 말고 평균을 내어, 기울기가 배치 크기에 "
                "따라 커지지 않게 합니다.",
        "snippet": "loss = F.cross_entropy(logits, y, reduction='mean')",
    },
})

NOTES.update({
    "time_budget": "시도하지 않음 (max_seconds 도달)",
})

UI.update({
    "worse": "나빠짐",
    "prescription": "처방: {remedy} — 손실이 처치하지 않은 실행의 {rel}배로 끝났습니다.",
    "lr_factor": "학습률 ×{factor}",
})
