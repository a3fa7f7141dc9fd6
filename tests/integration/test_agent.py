"""The agent path end to end: a real 2-rank `torchloom run` job under a policy, an agent token made with
`torchloom token add-agent`, and `torchloom agent` against a local fake OpenAI-compatible endpoint
(http.server on 127.0.0.1) with scripted replies: one good `set lr`, one malformed, one out of bounds,
one forbidden action. The good one is applied on both ranks, issued by the agent's identity with
issuer kind "agent"; the others are refused and journaled, and nothing of them is applied. The
agent's token also streams the job's Watch, rule firings included."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import cli, kill_tree, min_step, start_cli
from tests.integration.test_autopilot import _until

SCRIPT = Path(__file__).parent / "scripts" / "nan_train.py"
JOB = "agjob"
POLICY = """name = "agents"
[[rule]]
name = "ckpt"
when = "every_steps"
steps = 100
cooldown_s = 0.0
max_per_hour = 600
do = [{action = "checkpoint"}]

[agent]
cooldown_s = 0.0
"""
REPLIES = [
    {"actions": [{"set": {"lr": 0.025}}], "reason": "halve the lr"},
    "lr should go down a bit, maybe 0.01?",  # malformed: prose, not JSON
    {"actions": [{"set": {"lr": 5.0}}], "reason": "much faster"},  # within the knob, 100 x its start
    {"actions": [{"action": "stop"}], "reason": "done"},  # forbidden unless the policy allows it
]


class FakeEndpoint(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint that answers each request with the next scripted reply."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = [r if isinstance(r, str) else json.dumps(r) for r in replies]
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeEndpoint

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        content = self.server.replies.pop(0) if self.server.replies else '{"actions": [], "reason": "idle"}'
        answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
        data = answer.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def endpoint() -> Iterator[FakeEndpoint]:
    server = FakeEndpoint(REPLIES)
    thread = threading.Thread(target=server.serve_forever, name="fake-llm", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _watch_until(env: dict[str, str], needle: str, timeout_s: float = 30.0) -> str:
    """`torchloom watch` with the agent's token until a line holds `needle`."""
    watch = subprocess.Popen(
        [sys.executable, "-m", "torchloom.app.cli", "watch", "--job", JOB],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    found: list[str] = []

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            if needle in line:
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    kill_tree(watch.pid)
    watch.communicate(timeout=10)
    assert found, f"no watch line with {needle!r} in {timeout_s} s"
    return found[0]


@pytest.mark.timeout(240)
def test_an_llm_agent_steers_a_job_through_the_guardrails(
    tmp_path: Path, run_alone_env: dict[str, str], endpoint: FakeEndpoint
) -> None:
    env = dict(run_alone_env, TORCHLOOM_TEST_NAN_AT_STEP="100000000")
    policy = tmp_path / "agents.toml"
    policy.write_text(POLICY)
    out = tmp_path / "out"
    run = ["run", "--policy", str(policy), "--job", JOB, "--nproc-per-node", "2", str(SCRIPT)]
    proc = start_cli(*run, "--steps", "100000", "--out", str(out), "--step-sleep", "0.05", env=env)
    try:
        _until("step 5", lambda: min_step(env) >= 5, proc, timeout_s=60.0)
        token_file = tmp_path / "agent.token"
        added = cli("token", "add-agent", "tester", "--out", str(token_file), env=env)
        assert added.returncode == 0 and "agent:tester" in added.stderr, added.stderr
        agent_env = {**env, "TORCHLOOM_TOKEN": token_file.read_text().strip()}
        # The agent's token streams the job's Watch, the rules' firings in it.
        assert "rule ckpt" in _watch_until(agent_env, "rule_fired")

        agent = cli(
            "agent",
            "--endpoint",
            endpoint.url,
            "--model",
            "fake-model",
            "--job",
            JOB,
            "--interval",
            "0.2",
            "--rounds",
            "4",
            "--token-file",
            str(token_file),
            env={**env, "TORCHLOOM_AGENT_API_KEY": "sk-test-key"},
            timeout_s=90,
        )
        assert agent.returncode == 0, agent.stdout + agent.stderr
        assert "proposed set lr=0.025: applied" in agent.stdout, agent.stdout
        assert "reply refused: not JSON" in agent.stdout, agent.stdout
        stopped = cli("stop", "--json", env=env, timeout_s=60)
        assert json.loads(stopped.stdout)["status"] == "applied", stopped.stdout + stopped.stderr
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]

    # What the endpoint was sent: four rounds, the key from the environment, the knob schema.
    assert len(endpoint.requests) == 4
    path, headers, body = endpoint.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test-key"
    assert body["model"] == "fake-model"
    state = json.loads(body["messages"][1]["content"])
    assert state["job"] == JOB and next(k for k in state["knobs"] if k["name"] == "lr")["max"] == 10.0
    later = json.loads(endpoint.requests[1][2]["messages"][1]["content"])
    assert any("lr=0.025 by agent:tester: applied" in line for line in later["recent_interventions"])

    # Only the good proposal was applied, on both ranks at the same step.
    per_rank = [json.loads((out / f"rank{r}.applied.json").read_text()) for r in (0, 1)]
    assert per_rank[0] == per_rank[1]
    decided = per_rank[0]
    sets = [d for d in decided if d["kind"] == "set"]
    assert [(d["values"], d["status"]) for d in sets] == [({"lr": 0.025}, "applied")], decided
    assert [d["kind"] for d in decided if d["kind"] != "checkpoint"] == ["set", "stop"], decided
    records = [json.loads(line) for line in (out / "rank0.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] == pytest.approx(0.025)

    res = cli("journal", "--job", JOB, "--json", env=env)
    assert res.returncode == 0, res.stderr
    entries: list[dict[str, Any]] = json.loads(res.stdout)["entries"]
    by_agent = [e for e in entries if e["type"] == "outcome" and (e["issuer"] or {}).get("kind") == "agent"]
    assert [(e["kind"], e["values"], e["status"]) for e in by_agent] == [
        ("set", {"lr": 0.025}, "applied"),
        ("set", {"lr": 5.0}, "rejected"),  # refused before a command was made: what was asked
        ("stop", {}, "rejected"),
    ], by_agent
    assert {e["issuer"]["identity"] for e in by_agent} == {"agent:tester"}
    refused = [e for e in entries if e["type"] == "event" and e["kind"] == "agent_refused"]
    assert [(e["attrs"]["agent"], e["attrs"]["stage"]) for e in refused] == [
        ("agent:tester", "reply"),
        ("agent:tester", "guardrails"),
        ("agent:tester", "guardrails"),
    ], refused
    assert "not JSON" in refused[0]["attrs"]["reason"] and "lr should go down" in refused[0]["attrs"]["reply"]
    assert (
        "lr=5 refused" in refused[1]["attrs"]["reason"] and "[0.0005, 0.5]" in refused[1]["attrs"]["reason"]
    )
    assert "action 'stop' is forbidden" in refused[2]["attrs"]["reason"]
