"""Channel URL parsing. AF_VSOCK is never bound or connected on these machines."""

from __future__ import annotations

import pytest

from schemas.transport import ChannelAddress, TransportUrlError, parse_channel_url


@pytest.mark.parametrize(
    ("url", "addr"),
    [
        ("unix:///run/enclave.sock", ChannelAddress("unix", path="/run/enclave.sock")),
        ("tcp://127.0.0.1:5005", ChannelAddress("tcp", host="127.0.0.1", port=5005)),
        ("vsock://16:5000", ChannelAddress("vsock", cid=16, port=5000)),
        ("vsock://4294967295:5000", ChannelAddress("vsock", cid=4294967295, port=5000)),
    ],
)
def test_urls_name_their_transport(url: str, addr: ChannelAddress) -> None:
    assert parse_channel_url(url) == addr
    assert str(addr) == url


@pytest.mark.parametrize(
    "url", ["http://x:1", "unix://relative.sock", "tcp://host", "tcp://h:notaport", "vsock://cid:5000", "vsock://3"]
)
def test_bad_urls_are_refused_with_a_reason(url: str) -> None:
    with pytest.raises(TransportUrlError, match=r"."):
        parse_channel_url(url)


@pytest.mark.parametrize(
    ("url", "latency_s", "bps"),
    [
        ("unix:///x.sock?latency_ms=2", 0.002, 0.0),
        ("tcp://127.0.0.1:1?bandwidth_mbps=80", 0.0, 10e6),
        ("tcp://127.0.0.1:1?latency_ms=0.5&bandwidth_mbps=8", 0.0005, 1e6),
    ],
)
def test_emulated_links_take_shaping_parameters(url: str, latency_s: float, bps: float) -> None:
    shaping = parse_channel_url(url).shaping
    assert (
        shaping.active and shaping.latency_s == pytest.approx(latency_s) and shaping.bandwidth_bps == pytest.approx(bps)
    )


@pytest.mark.parametrize(
    "url",
    [
        "vsock://16:5000?latency_ms=1",
        "unix:///x.sock?latency=1",
        "unix:///x.sock?latency_ms=-1",
        "tcp://h:1?bandwidth_mbps=fast",
    ],
)
def test_bad_shaping_is_refused(url: str) -> None:
    with pytest.raises(TransportUrlError):
        parse_channel_url(url)


class _RecordingSocket:
    def __init__(self, family: int, kind: int) -> None:
        self.family, self.kind = family, kind
        self.blocking: bool | None = None

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag


def test_vsock_sockets_are_af_vsock_stream_and_non_blocking() -> None:
    import socket

    from schemas.transport import vsock_socket

    sock = vsock_socket(_RecordingSocket)  # type: ignore[arg-type]
    assert sock.family == getattr(socket, "AF_VSOCK", 40)  # type: ignore[attr-defined]
    assert sock.kind == socket.SOCK_STREAM and sock.blocking is False  # type: ignore[attr-defined]
