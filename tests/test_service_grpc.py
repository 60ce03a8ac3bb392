"""gRPC ingest against a real service process: TLS, per-device tokens, per-frame acks, health, Decode."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from service_helpers import ServiceProcess, expected_image, make_envelope, make_stream

from mridc.cloud.service.security import new_token, write_token_file
from mridc.lab.certs import generate_test_pki
from mridc.v1 import mridc_pb2, mridc_pb2_grpc

pytestmark = pytest.mark.net
Ack = mridc_pb2.FrameAck


@pytest.fixture(scope="module")
def grpc_service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpc-service")
    pki = generate_test_pki(tmp / "pki")
    tokens = {"cam-a": new_token(), "cam-b": new_token()}
    token_file = write_token_file(tmp / "tokens.json", tokens)
    service = ServiceProcess(["--grpc", "127.0.0.1:0", "--grpc-cert", str(pki.server_cert), "--grpc-key",
                              str(pki.server_key), "--grpc-tokens", str(token_file), "--out", str(tmp / "out"),
                              "--decoder", "service_helpers:make_test_decoder", "--worker-id", "g0"],
                             log_path=tmp / "service.log")
    credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{service.ready['grpc_port']}", credentials)
    yield channel, tokens, tmp / "out"
    channel.close()
    assert service.terminate() == 0


def upload(channel, token, envelopes, timeout=20):
    stub = mridc_pb2_grpc.FrameIngestStub(channel)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    return list(stub.Upload(iter(envelopes), metadata=metadata, timeout=timeout))


def test_upload_acks_each_frame_after_storing(grpc_service):
    channel, tokens, out = grpc_service
    acks = upload(channel, tokens["cam-a"], [make_envelope("cam-a", s) for s in (1, 2, 3, 2)])
    assert sorted(a.sequence for a in acks) == [1, 2, 2, 3]
    # The repeated frame is answered twice (STORED while it is in flight, DUPLICATE after) and stored once.
    assert {a.status for a in acks} <= {Ack.STORED, Ack.DUPLICATE}
    assert len(list((out / "frames" / "cam-a").glob("cam-a_00000000000[123].png"))) == 3
    stored = np.asarray(Image.open(out / "frames" / "cam-a" / "cam-a_000000000003.png"))
    assert np.array_equal(stored, expected_image("cam-a", 3))


def test_a_token_only_speaks_for_its_own_device(grpc_service):
    channel, tokens, out = grpc_service
    acks = upload(channel, tokens["cam-b"], [make_envelope("cam-a", 50), make_envelope("cam-b", 1)])
    by_seq = {(a.device_id, a.sequence): a for a in acks}
    assert by_seq[("cam-b", 50)].status == Ack.REJECTED  # acked to the caller, never stored as cam-a
    assert by_seq[("cam-b", 50)].reason.startswith("unauthorized_device")
    assert by_seq[("cam-b", 1)].status == Ack.STORED
    assert not (out / "frames" / "cam-a" / "cam-a_000000000050.png").exists()
    for token in (None, "not-a-token"):
        with pytest.raises(grpc.RpcError) as info:
            upload(channel, token, [make_envelope("cam-a", 60)])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_decode(grpc_service):
    channel, tokens, _ = grpc_service
    health = health_pb2_grpc.HealthStub(channel)
    for service_name in ("", "mridc.v1.FrameIngest"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    stub = mridc_pb2_grpc.FrameIngestStub(channel)
    metadata = [("authorization", f"Bearer {tokens['cam-a']}")]
    response = stub.Decode(mridc_pb2.DecodeRequest(bitstream=make_stream("cam-a", 9)), metadata=metadata, timeout=10)
    assert (response.width, response.height) == (64, 48)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.png))), expected_image("cam-a", 9))
    with pytest.raises(grpc.RpcError) as info:
        stub.Decode(mridc_pb2.DecodeRequest(bitstream=b"MR\x01junk"), metadata=metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
