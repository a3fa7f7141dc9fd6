"""The embedded nats-server: starts on a free loopback port with JetStream, restarts on its port."""

from __future__ import annotations

from pathlib import Path

from torchloom import bus, subjects
from torchloom.nats_server import EmbeddedNats


async def test_embedded_server_serves_jetstream_and_restarts_on_the_same_port(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "run").start()
    try:
        assert server.url.startswith("nats://127.0.0.1:")
        assert server.ws_url.startswith("ws://127.0.0.1:")
        nc = await bus.connect(server.url, name="test")
        js = nc.jetstream()
        await bus.ensure_streams(js)
        await bus.ensure_streams(js)  # idempotent
        ack = await js.publish(subjects.commands("j", "r"), b"x")
        assert ack.stream == subjects.STREAM_COMMANDS
        await nc.close()
        url = server.url
        server.stop()
        assert not server.running()
        server.start()  # same port, same store: the message survived
        assert server.url == url
        nc = await bus.connect(server.url, name="test")
        msg = await nc.jetstream().get_last_msg(subjects.STREAM_COMMANDS, subjects.commands("j", "r"))
        assert msg.data == b"x"
        await nc.close()
        assert (tmp_path / "run" / "jetstream").is_dir()
    finally:
        server.stop()
