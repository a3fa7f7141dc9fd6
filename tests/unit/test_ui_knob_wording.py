"""The UI's pre-send knob check (ui/src/logic.js validateKnob, run in node) refuses exactly what the
weaver (torchloom.knobs.validate_set) and a rank's mix check (threadlet.data.parse_mix) refuse, with
the same message, for every built-in knob type: FLOAT, INT, FLOAT_LIST (betas), STR (mix)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace

import pytest

from tests.conftest import REPO
from threadlet.data import parse_mix
from torchloom.errors import CommandRejected
from torchloom.knobs import BUILTIN_SPECS, validate_set
from torchloom.messages import KnobSpec

SOURCES = ("code", "math")
CASES: list[tuple[str, str]] = [
    ("lr", "-1"), ("lr", "0"), ("lr", "abc"), ("lr", "nan"), ("lr", "inf"), ("lr", "10"), ("lr", "1e-3"),
    ("lr", "10.5"), ("lr@head", "0.1"), ("lr@nope", "0.1"), ("eps", "0"), ("eps", "2"), ("eps", "1e-8"),
    ("weight_decay", "-0.1"), ("weight_decay", "0"), ("weight_decay", "x"),
    ("grad_clip_norm", "2000000"), ("grad_clip_norm", "0"), ("grad_clip_norm", "1.5"),
    ("grad_accum_steps", "0"), ("grad_accum_steps", "4.5"), ("grad_accum_steps", "2048"),
    ("grad_accum_steps", "4"), ("batch_size", "65537"), ("batch_size", "x"), ("batch_size", "32"),
    ("betas", "0.9"), ("betas", "0.9,0.999"), ("betas", "0.9, 0.999"), ("betas", "0.9,1"),
    ("betas", "0.9,0.99,0.999"), ("betas", "a,b"), ("betas", "-0.1,0.5"), ("betas", ","),
    ("betas@head", "0.8,0.9"),
    ("mix", "code:0.5,math:0.5"), ("mix", "code:1"), ("mix", "code"), ("mix", "code:x"),
    ("mix", "code:-1"), ("mix", "code:0,math:0"), ("mix", "art:1"), ("mix", "code:1,code:2"),
    ("mix", "code:inf"),
]  # fmt: skip


def _python_verdict(key: str, raw: str) -> str | None:
    name = key.split("@", 1)[0]
    spec = replace(BUILTIN_SPECS[name], groups=("head", "body"))
    try:
        validate_set({name: spec}, {key: raw})
        if name == "mix":
            parse_mix(raw, SOURCES)
    except CommandRejected as exc:
        return exc.reason
    return None


def _js_spec(spec: KnobSpec) -> dict[str, object]:
    return {
        "name": spec.name,
        "type": spec.type.name.lower(),
        "min": spec.min,
        "max": spec.max,
        "minExclusive": spec.min_exclusive,
        "maxExclusive": spec.max_exclusive,
        "groups": ["head", "body"],
        "choices": list(spec.choices),
        # The current mix names every source, as a rank reports it.
        "value": "code:0.5,math:0.5" if spec.name == "mix" else None,
    }


def test_ui_refuses_what_the_weaver_and_ranks_refuse_with_their_wording() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    specs = {name: _js_spec(spec) for name, spec in BUILTIN_SPECS.items()}
    script = (
        "import { validateKnob } from './src/logic.js';"
        f"const specs = {json.dumps(specs)}; const cases = {json.dumps(CASES)};"
        "console.log(JSON.stringify(cases.map(([k, raw]) => {"
        " const r = validateKnob(k, specs[k.split('@')[0]], raw); return r.ok ? null : r.error; })));"
    )
    proc = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=REPO / "ui",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    js = json.loads(proc.stdout)
    mismatches = [
        (key, raw, py, ui)
        for (key, raw), ui in zip(CASES, js, strict=True)
        if ui != (py := _python_verdict(key, raw))
    ]
    assert not mismatches, "\n".join(f"{k}={r!r}: python {p!r} vs ui {u!r}" for k, r, p, u in mismatches)
    # The cases exercise both verdicts for every type.
    assert sum(v is None for v in js) >= 8 and sum(v is not None for v in js) >= 25
