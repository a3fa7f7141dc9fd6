"""Cost of signed commands: what signing adds per command on the weaver (serialize, sign, append the
signature, against serializing an unsigned command for publish) and on each rank (verify the received
bytes and parse the signed part, against parsing an unsigned command), in microseconds, p50/p99 over
single calls; the rank's receive as it was with libsodium's verify (PyNaCl; ed25519-zebra since session
7) and each library's Ed25519 alone are timed in the same run for comparison. Optionally the end-to-end
command latency on a real 2-rank job with the ranks verifying vs. with verification off
(TORCHLOOM_VERIFY_COMMANDS=0), using bench/command_latency.py's machinery.

    python bench/signing.py --iterations 20000 --commands 0
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ed25519_zebra
from nacl.signing import SigningKey, VerifyKey

from torchloom import env, signing, wire
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


def _operations(cmd: m.Command, signer: signing.Signer) -> dict[str, Callable[[], object]]:
    """What each side does per command, by name: the weaver's publish and the rank's receive without
    signing and with it; the receive as it was with libsodium's verify ("pynacl", until session 7);
    and each library's Ed25519 alone on the same bytes (the floor)."""
    verifier = signer.verifier()
    plain = wire.encode(cmd)
    published = signer.encode_signed(cmd)
    assert verifier.decode_command(published) == (signer.sign(cmd), True)
    sodium_key = VerifyKey(bytes.fromhex(signer.public_key))

    def receive_pynacl() -> tuple[m.Command, bool]:
        split = wire.split_signature(published)
        assert split is not None
        signed, signature = split
        sodium_key.verify(b"torchloom.v1.Command\x00" + signed, signature)
        return wire.decode_signed_command(signed, signature), True

    assert receive_pynacl() == verifier.decode_command(published)
    key = SigningKey.generate()
    tagged = b"torchloom.v1.Command\x00" + wire.signing_bytes(cmd)  # what signing.py signs
    tag_signature = bytes(key.sign(tagged).signature)
    public = bytes(key.verify_key)
    return {
        "publish_plain": lambda: wire.encode(cmd),  # a publish without signing
        "publish_signed": lambda: signer.encode_signed(cmd),
        "receive_plain": lambda: wire.decode_command(plain),  # a receive without verifying
        "receive_signed": lambda: verifier.decode_command(published),
        "receive_signed_pynacl": receive_pynacl,
        "ed25519_sign_alone": lambda: key.sign(tagged),
        "ed25519_verify_alone_pynacl": lambda: key.verify_key.verify(tagged, tag_signature),
        "ed25519_verify_alone_zebra": lambda: ed25519_zebra.ed_verify(tag_signature, tagged, public),
    }


def _added(us: dict[str, list[float]], suffix: str) -> dict[str, float]:
    """Microseconds signing adds on each side and in all, at p50 and p99 (differences of the
    percentiles of the signed and the unsigned calls); `suffix` picks the receive measured."""
    out: dict[str, float] = {}
    for q in (50, 99):
        sign = command_latency.pct(us["publish_signed"], q) - command_latency.pct(us["publish_plain"], q)
        verify = command_latency.pct(us["receive_signed" + suffix], q) - command_latency.pct(
            us["receive_plain"], q
        )
        out |= {f"sign_p{q}": sign, f"verify_p{q}": verify, f"total_p{q}": sign + verify}
    return out


def micro(iterations: int) -> dict[str, dict[str, Any]]:
    """Per command kind: each operation's p50/p99 in microseconds over `iterations` single calls (the
    operations interleaved, so load changes hit all alike), and what signing adds, now and with
    libsodium's verify."""
    signer = signing.Signer.generate()
    out: dict[str, dict[str, Any]] = {}
    for name, cmd in _commands().items():
        ops = _operations(cmd, signer)
        us: dict[str, list[float]] = {op: [] for op in ops}
        for _ in range(iterations):
            for op, call in ops.items():
                t0 = time.perf_counter_ns()
                call()
                us[op].append((time.perf_counter_ns() - t0) / 1e3)
        out[name] = {
            "us": {
                op: {"p50": statistics.median(v), "p99": command_latency.pct(v, 99)} for op, v in us.items()
            },
            "added_us": _added(us, ""),
            "added_us_pynacl": _added(us, "_pynacl"),
        }
    return out


def _print_micro(micro_us: dict[str, dict[str, Any]]) -> None:
    names = list(micro_us)
    header = "".join(f"{n + ' p50':>17}{n + ' p99':>17}" for n in names)
    print(f"\n{'us per call':<24}{header}")
    for op in micro_us[names[0]]["us"]:
        cells = [micro_us[n]["us"][op] for n in names]
        print(f"{op:<24}" + "".join(f"{c['p50']:>17.1f}{c['p99']:>17.1f}" for c in cells))
    for key, label in (("added_us", "signing adds (now)"), ("added_us_pynacl", "with libsodium verify")):
        print(f"\n{label:<24}{header}")
        for part in ("sign", "verify", "total"):
            cells = [micro_us[n][key] for n in names]
            print(
                f"{part:<24}" + "".join(f"{c[part + '_p50']:>17.1f}{c[part + '_p99']:>17.1f}" for c in cells)
            )


def latency(commands: int, step_sleep: float, modes: list[str]) -> dict[str, object]:
    """Command latency on a real job (examples/train_tiny.py, agreement on the gradient all-reduce) with
    ranks verifying (command_latency hands them the weaver's public key), then with verification off."""
    os.environ[env.HOME] = tempfile.mkdtemp(prefix="tl-bench-sign-")  # the weaver's key goes here
    os.environ.pop(env.WEAVER_PUBKEY, None)
    results: dict[str, object] = {}
    for mode in modes:
        if mode == "verify":
            os.environ.pop(env.VERIFY_COMMANDS, None)
        else:
            os.environ[env.VERIFY_COMMANDS] = "0"
        args = argparse.Namespace(
            commands=commands, step_sleep=step_sleep, gap_s=0.0, model="tiny", device_ms=0.0
        )
        results[mode] = asyncio.run(command_latency.run(args, command_latency.PATHS["piggyback"]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--commands", type=int, default=100, help="per mode; 0 skips the job runs")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--modes", default="verify,no_verify", help="comma-separated: verify, no_verify")
    parser.add_argument("--out", default=str(REPO / "bench/results/signing.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    micro_us = micro(args.iterations)
    load_after = os.getloadavg()
    result: dict[str, Any] = {"micro_us": micro_us, "iterations": args.iterations}
    result["load_average"] = {"before": load_before, "after": load_after}
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    _print_micro(micro_us)
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
