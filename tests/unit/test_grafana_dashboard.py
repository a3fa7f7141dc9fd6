"""deploy/grafana/torchloom-dashboard.json: valid JSON, every query names a metric the weaver exports
(weaver.metrics.METRIC_NAMES), and every exported metric has a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from weaver.metrics import METRIC_NAMES

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "torchloom-dashboard.json"
_NAME = re.compile(r"\btorchloom_[a-z0-9_]+")
_HISTOGRAM_PARTS = re.compile(r"_(bucket|sum|count)$")


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    assert exprs
    for expr in exprs:
        names = _NAME.findall(expr)
        assert names, f"query names no torchloom metric: {expr}"
        unknown = [n for n in names if n not in METRIC_NAMES]
        assert not unknown, f"{expr}: {unknown} not exported by the weaver (weaver.metrics.METRIC_NAMES)"


def test_every_exported_metric_has_a_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    shown = {_HISTOGRAM_PARTS.sub("", n) for expr in queries(dashboard) for n in _NAME.findall(expr)}
    families = {_HISTOGRAM_PARTS.sub("", n) for n in METRIC_NAMES}
    assert families - shown == set(), "exported metrics without a panel"


def test_panels_are_unique_and_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
