"""Cost of signed commands: Ed25519 sign (weaver, per publish) and verify (each rank, on its bus thread)
in microseconds per command, including the deterministic serialization, and the end-to-end command
latency on a real 2-rank job with the ranks verifying vs. with verification off
(TORCHLOOM_VERIFY_COMMANDS=0), using bench/command_latency.py's machinery.

    python bench/signing.py --iterations 20000 --commands 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torchloom import env, signing
from torchloom import messages as m

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import command_latency  # noqa: E402  (a sibling script, not a package)


def _commands() -> dict[str, m.Command]:
    base = {
        "command_id": "0123456789abcdef0123456789abcdef",
        "job": "bench",
        "run_id": "0123456789ab",
        "seq": 42,
        "issuer": m.Issuer(kind="cli", identity="user@host"),
        "issued_at_s": time.time(),
    }
    return {
        "set lr": m.Command(body=m.SetConfig(values={"lr": 0.003}), **base),  # type: ignore[arg-type]
        "set 8 knobs": m.Command(
            body=m.SetConfig(
                values={
                    "lr": 0.003,
                    "lr@head": 0.01,
                    "weight_decay": 0.1,
                    "betas": (0.9, 0.95),
                    "eps": 1e-8,
                    "grad_clip_norm": 1.0,
                    "batch_size": 64,
                    "mix": "code:0.5,math:0.3,web:0.2",
                }
            ),
            **base,  # type: ignore[arg-type]
        ),
        "rollback": m.Command(
            body=m.Action(
                kind=m.ActionKind.ROLLBACK, args={"checkpoint": "ckpt-3", "checkpoint_id": "ckpt-3"}
            ),
            **base,  # type: ignore[arg-type]
        ),
    }


def micro(iterations: int) -> dict[str, dict[str, float]]:
    """Microseconds per sign and per verify (median and p99 over batches of 100)."""
    signer = signing.Signer.generate()
    verifier = signer.verifier()
    out: dict[str, dict[str, float]] = {}
    for name, cmd in _commands().items():
        signed = signer.sign(cmd)
        assert verifier.verify(signed)
        sign_us: list[float] = []
        verify_us: list[float] = []
        for _ in range(max(1, iterations // 100)):
            t0 = time.perf_counter()
            for _ in range(100):
                signer.sign(cmd)
            t1 = time.perf_counter()
            for _ in range(100):
                verifier.verify(signed)
            t2 = time.perf_counter()
            sign_us.append((t1 - t0) / 100 * 1e6)
            verify_us.append((t2 - t1) / 100 * 1e6)
        out[name] = {
            "sign_us_p50": statistics.median(sign_us),
            "sign_us_p99": command_latency.pct(sign_us, 99),
            "verify_us_p50": statistics.median(verify_us),
            "verify_us_p99": command_latency.pct(verify_us, 99),
        }
    return out


def latency(commands: int, step_sleep: float, modes: list[str]) -> dict[str, object]:
    """Command latency on a real job with ranks verifying (command_latency hands them the weaver's
    public key), then with verification off."""
    os.environ[env.HOME] = tempfile.mkdtemp(prefix="tl-bench-sign-")  # the weaver's key goes here
    os.environ.pop(env.WEAVER_PUBKEY, None)
    results: dict[str, object] = {}
    for mode in modes:
        if mode == "verify":
            os.environ.pop(env.VERIFY_COMMANDS, None)
        else:
            os.environ[env.VERIFY_COMMANDS] = "0"
        args = argparse.Namespace(commands=commands, step_sleep=step_sleep)
        results[mode] = asyncio.run(command_latency.run(args))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--commands", type=int, default=100, help="per mode; 0 skips the job runs")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--modes", default="verify,no_verify", help="comma-separated: verify, no_verify")
    parser.add_argument("--out", default=str(REPO / "bench/results/signing.json"))
    args = parser.parse_args()
    result: dict[str, object] = {"micro_us": micro(args.iterations)}
    print(f"{'command':<14}{'sign p50 us':>13}{'sign p99 us':>13}{'verify p50 us':>15}{'verify p99 us':>15}")
    for name, row in result["micro_us"].items():  # type: ignore[attr-defined]
        print(
            f"{name:<14}{row['sign_us_p50']:>13.1f}{row['sign_us_p99']:>13.1f}"
            f"{row['verify_us_p50']:>15.1f}{row['verify_us_p99']:>15.1f}"
        )
    if args.commands > 0:
        runs = latency(args.commands, args.step_sleep, args.modes.split(","))
        result["latency"] = runs
        print(f"\n{'end to end (ms)':<22}{'p50':>10}{'p99':>10}{'mean':>10}")
        for mode, res in runs.items():
            assert isinstance(res, dict)
            total = res["total_ms"]
            print(f"{mode:<22}{total['p50']:>10.3f}{total['p99']:>10.3f}{total['mean']:>10.3f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
