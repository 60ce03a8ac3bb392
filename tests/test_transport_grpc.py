"""gRPC transport against a real FrameIngest server on loopback: stream, acks, token, TLS, reconnects."""

from __future__ import annotations

import pytest
from test_transport_mqtt import fill_queue, forwarding, wait_until

from mridc.edge.queue import FrameQueue
from mridc.edge.transport import Backoff, TlsFiles, open_transport
from mridc.edge.transport.grpc import GrpcTransport
from mridc.v1 import mridc_pb2

pytestmark = [pytest.mark.net, pytest.mark.timeout(60)]


def test_upload_stream_acks_empty_the_queue(tmp_path, grpc_cloud_factory):
    cloud = grpc_cloud_factory(token="tok-cam-01")
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    sequences = fill_queue(queue, 10)
    transport = open_transport(f"grpc://127.0.0.1:{cloud.port}", "cam-01", token="tok-cam-01")
    assert isinstance(transport, GrpcTransport)
    with forwarding(queue, transport, window=4):
        assert wait_until(lambda: len(queue) == 0), transport.last_error
    assert cloud.sequences("cam-01") == sequences
    assert len(cloud.deliveries) == 10 and not cloud.bad


def test_wrong_token_is_refused_and_nothing_leaves_the_queue(tmp_path, grpc_cloud_factory):
    cloud = grpc_cloud_factory(token="right")
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    fill_queue(queue, 2)
    transport = open_transport(f"grpc://127.0.0.1:{cloud.port}", "cam-01", token="wrong",
                               backoff=Backoff(0.2, 0.5))
    with forwarding(queue, transport):
        assert wait_until(lambda: "UNAUTHENTICATED" in transport.last_error, 10)
    assert len(queue) == 2 and not cloud.frames


def test_tls_with_client_certificate(tmp_path, test_pki, grpc_cloud_factory):
    cloud = grpc_cloud_factory(token="t", tls_server=(test_pki.server_key.read_bytes(),
                                                      test_pki.server_cert.read_bytes()))
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    fill_queue(queue, 3)
    tls = TlsFiles(str(test_pki.ca_cert), str(test_pki.client_cert("cam-01")), str(test_pki.client_key("cam-01")))
    transport = open_transport(f"grpcs://127.0.0.1:{cloud.port}", "cam-01", token="t", tls=tls)
    with forwarding(queue, transport):
        assert wait_until(lambda: len(queue) == 0), transport.last_error
    assert cloud.sequences("cam-01") == [1, 2, 3]


def test_retry_later_keeps_the_frame_until_accepted(tmp_path, grpc_cloud_factory):
    calls: dict[int, int] = {}

    def busy_first(envelope):
        calls[envelope.sequence] = calls.get(envelope.sequence, 0) + 1
        return mridc_pb2.FrameAck.RETRY_LATER if calls[envelope.sequence] == 1 else mridc_pb2.FrameAck.STORED

    cloud = grpc_cloud_factory(decide=busy_first)
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    fill_queue(queue, 3)
    transport = open_transport(f"grpc://127.0.0.1:{cloud.port}", "cam-01")
    with forwarding(queue, transport, retry_later_s=0.3) as forwarder:
        assert wait_until(lambda: len(queue) == 0), forwarder.stats
    assert calls == {1: 2, 2: 2, 3: 2}
    assert queue.stats()["retry_later"] == 3 and forwarder.stats["retry_later"] == 3


def test_server_restart_resets_the_stream_and_unacked_frames_are_resent(tmp_path, grpc_cloud_factory, free_port):
    hold = {"on": True}
    # While "on", the server takes frames but never acks them: they stay in flight.
    cloud = grpc_cloud_factory(free_port, decide=lambda env: None if hold["on"] else mridc_pb2.FrameAck.STORED)
    queue = FrameQueue(tmp_path / "q.db", "cam-01")
    fill_queue(queue, 2)
    transport = open_transport(f"grpc://127.0.0.1:{free_port}", "cam-01", backoff=Backoff(0.2, 1.0))
    with forwarding(queue, transport, ack_timeout_s=120) as forwarder:
        assert wait_until(lambda: len(cloud.deliveries) == 2)
        cloud.stop()
        hold["on"] = False
        cloud.start()  # same port
        assert wait_until(lambda: len(queue) == 0, 20), (forwarder.stats, transport.last_error)
        assert forwarder.stats["resets"] >= 1 and forwarder.stats["resent"] == 2
    assert cloud.sequences("cam-01") == [1, 2]
