"""The TCP source in-process, over real sockets: what one connection's failure may not do."""

import trio
import trio.testing

import logging

from sidecar.metrics import Counters
from sidecar.protocol import StreamDecoder
from sidecar.sources import Intake
from sidecar.sources.tcp import TcpSettings, TcpSource

GOOD = b'{"source":"svc","type":"event","data":{"level":"info","message":"m"}}\n'


async def test_a_bug_met_by_one_connection_closes_it_and_the_others_go_on(monkeypatch, caplog):
    real = StreamDecoder.receive_data

    def receive_data(self, data):
        if b"poison" in data:
            raise RuntimeError("a decoder bug")
        return real(self, data)

    monkeypatch.setattr(StreamDecoder, "receive_data", receive_data)
    counters = Counters()
    listener = TcpSource("tcp", TcpSettings(port=0), Intake("tcp", counters, logging.getLogger("test")))
    send_channel, receive_channel = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        host, port = (await nursery.start(listener.run, send_channel)).rsplit(":", 1)
        poisoned = await trio.open_tcp_stream(host, int(port))
        await poisoned.send_all(b'{"poison": 1}\n')
        assert await poisoned.receive_some(10) == b""  # closed by the sidecar
        healthy = await trio.open_tcp_stream(host, int(port))
        await healthy.send_all(GOOD)
        with trio.fail_after(5):
            _received_at, messages, _holds = await receive_channel.receive()
        assert len(messages) == 1
        await healthy.aclose()
        await poisoned.aclose()
        listener.stop_accepting()
        listener.close_connections(0)
    assert counters.get("connections_closed_total", input="tcp", reason="internal_error") == 1
    assert "internal error; connection closed" in caplog.text and "a decoder bug" in caplog.text
