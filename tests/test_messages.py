"""Every finding, cause, remedy and note code has text in English and Korean."""

from __future__ import annotations

import math
import re
import string

import pytest

from gradguard import messages as M
from gradguard.doctor.detectors import CAUSES, CODES, REMEDIES
from gradguard.findings import Finding, Severity
from gradguard.messages import en, ko
from gradguard.doctor.remedies import TREATMENTS

NOTES = ("manual", "needs_optimizer", "trial_limit", "failed", "not_applicable")
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def test_catalogues_have_the_same_keys() -> None:
    for name in ("FINDINGS", "CAUSES", "REMEDIES", "NOTES", "UI"):
        a, b = getattr(en, name), getattr(ko, name)
        assert set(a) == set(b), f"{name}: en-only {set(a) - set(b)}, ko-only {set(b) - set(a)}"
    for code in en.FINDINGS:
        assert set(en.FINDINGS[code]["text"]) == set(ko.FINDINGS[code]["text"]), code  # type: ignore[arg-type]


@pytest.mark.parametrize("lang", M.LANGS)
@pytest.mark.parametrize("code", CODES)
def test_every_finding_code_has_title_and_text(code: str, lang: str) -> None:
    cat = M._cat(lang)
    assert code in cat.FINDINGS, f"{code} has no {lang} text"
    entry = cat.FINDINGS[code]
    assert entry["title"] and entry["text"]
    for variant, text in entry["text"].items():  # type: ignore[union-attr]
        assert len(text) > 40, (code, variant)
        if lang == "ko":
            assert HANGUL.search(text), (code, variant)


def test_every_cause_and_remedy_code_has_text() -> None:
    assert set(TREATMENTS) <= set(REMEDIES)
    for lang in M.LANGS:
        cat = M._cat(lang)
        for c in CAUSES:
            assert cat.CAUSES.get(c, {}).get("title") and cat.CAUSES[c]["text"], (lang, c)
        for r in REMEDIES:
            entry = cat.REMEDIES.get(r)
            assert entry and entry["title"] and entry["text"] and entry["snippet"], (lang, r)
    assert set(en.CAUSES) == set(CAUSES) and set(en.REMEDIES) == set(REMEDIES)


@pytest.mark.parametrize("lang", M.LANGS)
@pytest.mark.parametrize("code", REMEDIES)
def test_remedy_snippets_are_python(code: str, lang: str) -> None:
    compile(M.remedy_snippet(code, lang), f"{code}.{lang}", "exec")


@pytest.mark.parametrize("lang", M.LANGS)
@pytest.mark.parametrize("key", NOTES)
def test_trial_notes(key: str, lang: str) -> None:
    assert M.note_text(key, lang) != key


def _fields(template: str) -> set[str]:
    template = M._PLURAL.sub(r"{\1}", template)  # "{n|layer|layers}" uses the field n
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def test_placeholders_are_the_same_in_both_languages() -> None:
    for code in en.FINDINGS:
        for variant, text in en.FINDINGS[code]["text"].items():  # type: ignore[union-attr]
            assert _fields(text) == _fields(ko.FINDINGS[code]["text"][variant]), (code, variant)  # type: ignore[index]
    for key, text in en.UI.items():
        assert _fields(text) == _fields(ko.UI[key]), key


# evidence as the detectors emit it, one per variant
_EVIDENCE = {
    "vanishing_gradients": [
        {"axis": "depth", "first_layer": "0", "ratio": 2e-5, "decay_per_layer": 0.14, "depth": 7, "n_layers": 5},
        {"axis": "time", "first_layer": "rnn", "ratio": 1e-9, "decay_per_step": 0.6, "time_steps": 40},
    ],
    "exploding_gradients": [
        {"axis": "depth", "ratio": 300.0, "growth_per_layer": 2.0},
        {"axis": "weights", "rel_grad": 306.0},
        {"axis": "time", "first_layer": "rnn", "ratio": 250.0, "growth_per_step": 1.2, "time_steps": 30},
        {"axis": "steps", "early_norm": 2.0, "peak_norm": 2e6, "growth": 1e6, "sustained": 1e3},
    ],
    "nonfinite_gradients": [{"first_step": 3, "steps": 2, "rows": 30, "origin": "fc", "n_layers": 4}],
    "nonfinite_loss": [
        {"at_start": True, "origin": ""},
        {"at_start": True, "origin": "0"},
        {"at_start": False, "first_step": 12, "last_finite_loss": 14.0, "growth_before": 1e9, "origin": "0"},
    ],
    "saturated_activations": [{"ops": "tanh", "worst": 0.9, "mean": 0.8, "n_layers": 4}],
    "dead_units": [{"worst": 0.9, "mean": 0.6, "n_layers": 2, "died_in_training": False},
                   {"worst": 0.9, "mean": 0.6, "n_layers": 2, "died_in_training": True}],
    "activation_scale_drift": [
        {"direction": "shrinks", "first_rms": 1.0, "last_rms": 1e-4, "depth": 24, "factor_per_layer": 0.7},
        {"direction": "grows", "first_rms": 1.0, "last_rms": 1e3, "depth": 8, "factor_per_layer": 2.6},
    ],
    "learning_rate_too_high": [
        {"update_ratio": 0.1, "max_update_ratio": 2.0, "loss_first": 2.3, "loss_last": 2.4, "went_nonfinite": False},
        {"update_ratio": 0.1, "max_update_ratio": 2.0, "went_nonfinite": True},
    ],
    "training_stalled": [{"loss_first": 2.3, "loss_last": 2.3, "update_ratio": 1e-7}],
    "loss_spike": [{"series": "loss", "ratio": 5.0, "first_step": 20, "z": 40.0, "count": 1},
                   {"series": "grad_norm", "ratio": 25.0, "first_step": 20, "z": 200.0, "count": 1}],
    "loss_divergence": [{"before": 4.2, "after": 60.0, "factor": 14.3, "first_step": 9,
                         "recovered": False, "length": 21},
                        {"before": 2.5, "after": 5.1, "factor": 2.04, "first_step": 40,
                         "recovered": True, "length": 12}],
    "loss_scale": [{"batch_ratio": 2.0, "caused": "learning_rate_too_high"}],
}


@pytest.mark.parametrize("lang", M.LANGS)
@pytest.mark.parametrize("code", CODES)
def test_every_variant_fills_its_numbers(code: str, lang: str) -> None:
    variants = set(en.FINDINGS[code]["text"])  # type: ignore[arg-type]
    seen = set()
    for ev in _EVIDENCE[code]:
        f = Finding(code, "warning", ["a"], [], [], ev)
        seen.add(M.finding_variant(f))
        text = f.explain(lang)
        assert "?" not in text, (code, ev, text)
        assert "{" not in text
    assert seen == variants, f"{code}: variants not exercised {variants - seen}"


def test_fmt_num() -> None:
    assert M.fmt_num(2.09e-5) == "2.09e-05"
    assert M.fmt_num(0.1414) == "0.141"
    assert M.fmt_num(906.2) == "906"
    assert M.fmt_num(math.nan) == "n/a" and M.fmt_num(math.inf) == "∞"
    assert M.fmt_num(25610) == "25,610" and M.fmt_num(True) == "True"


def test_unknown_lang_is_refused() -> None:
    with pytest.raises(ValueError, match="lang='ko'"):
        M.ui("healthy", "jp")


def test_format_layers_truncates() -> None:
    names = [str(i) for i in range(12)]
    assert M.format_layers(names, "en") == "0, 1, 2, 3, 4, 5, 6, 7 … and 4 more"
    assert M.format_layers(names, "ko").endswith("외 4개")
    assert M.format_layers([], "en") == "the whole network (no single layer)"


def test_plural_agreement() -> None:
    """Messages read as sentences: "1 layer sits", "3 layers sit", "1 step", "2 spikes"."""
    one = Finding("vanishing_gradients", Severity.ERROR, ["0.weight"], evidence={
        "axis": "depth", "first_layer": "0", "ratio": 2e-5, "decay_per_layer": 0.14, "depth": 7,
        "n_layers": 1})
    text = M.finding_text(one, "en")
    assert "1 layer sits at least" in text and "over 7 layers" in text
    many = Finding("vanishing_gradients", Severity.ERROR, ["0.weight"], evidence={
        **one.evidence, "n_layers": 3})
    assert "3 layers sit at least" in M.finding_text(many, "en")
    assert M.ui("run_summary_history", "en", mode="recorded run", steps=1, tensors=1, model="m") == \
        "recorded run: 1 step, 1 tensor (m)"
    assert M.ui("demo_accuracy", "en", epochs=1, acc="90%", remedy="x", base="10%").startswith(
        "Test accuracy after 1 epoch: 90% with the remedy “x”")
    spikes = Finding("loss_spike", Severity.WARNING, [], evidence={"series": "loss", "count": 2, "z": 9.0})
    assert "2 such spikes" in M.finding_text(spikes, "en")
    # no template is left unfilled and no "(s)" remains anywhere in the English catalogue
    assert "(s)" not in repr(en.FINDINGS) + repr(en.UI)


#: The Korean glossary (docs/korean.md): the term used, and the variants that must not appear.
KO_GLOSSARY = {"기울기": ("그래디언트", "그라디언트"), "에포크": ("에폭",)}


def test_one_korean_glossary_everywhere() -> None:
    from pathlib import Path

    src = Path(M.__file__).resolve().parents[1]
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for term, banned in KO_GLOSSARY.items():
            for word in banned:
                assert word not in text, f"{path.relative_to(src)} writes {word!r}; the glossary says {term!r}"
    assert "기울기" in ko.FINDINGS["vanishing_gradients"]["title"]  # type: ignore[operator]


def test_progress_labels_in_the_reports_language() -> None:
    from gradguard.cli._render import stage_label

    assert stage_label("baseline", "ko") == ko.UI["baseline"]
    assert stage_label("relu_family", "ko") == M.remedy_title("relu_family", "ko") != "relu_family"
    assert stage_label("relu_family", "en") == M.remedy_title("relu_family", "en")
    assert stage_label("something_new", "ko") == "something_new"
