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
