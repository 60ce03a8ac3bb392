"""Shared fixtures: free loopback ports, real mosquitto brokers, a throwaway PKI, link emulators.

- ``free_port``: an int, a TCP port on 127.0.0.1 that was free a moment ago.
- ``mosquitto``: a running ``MosquittoBroker`` (anonymous, persistence on, so ``restart()`` keeps
  sessions); ``.port``, ``.url``, ``.restart(down_for=...)``, ``.stop()``, ``.log_tail()``.
- ``mosquitto_factory(**options)``: more brokers with TLS / password file / ACL (see
  ``lab/broker.py``); all are stopped at teardown.
- ``test_pki``: CA + server cert for 127.0.0.1/localhost + client certs ``cam-01``, ``cam-02``,
  ``cloud`` (session scope; ``lab/certs.py``).
- ``link_factory(upstream_port, **options)``: a started ``LinkEmulator`` in front of a port
  (``lab/link.py``); ``.port`` is where clients connect. Stopped at teardown.
- ``mqtt_cloud_factory(broker_port, **options)`` / ``grpc_cloud_factory(port=0, token=..., tls_server=...)``:
  ``mridc.cloud.service.receiver``'s minimal receivers (a paho subscriber / a FrameIngest server) that
  check the content hash, dedupe by (device, sequence), ack, and record ``.deliveries`` (all) and
  ``.frames`` (deduped).

Imports are inside the fixtures, so a test module that uses none of them never pays for them.
"""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def free_port() -> int:
    from mridc.lab.broker import free_port as _free_port

    return _free_port()


def _require_mosquitto() -> None:
    if shutil.which("mosquitto") is None and not any(
        shutil.which(p) for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
    ):
        import os

        if os.environ.get("MRIDC_REQUIRE_MOSQUITTO") == "1":  # `make test` installs it: missing is a failure
            pytest.fail("mosquitto is not installed (Debian package 'mosquitto'); run `make setup` as root")
        pytest.skip("mosquitto is not installed (Debian package 'mosquitto')")


@pytest.fixture
def mosquitto_factory():
    _require_mosquitto()
    from mridc.lab.broker import MosquittoBroker

    brokers = []

    def _make(**options) -> MosquittoBroker:
        broker = MosquittoBroker(**options).start()
        brokers.append(broker)
        return broker

    yield _make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory):
    return mosquitto_factory(persistence=True)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    from mridc.lab.certs import generate_test_pki

    return generate_test_pki(tmp_path_factory.mktemp("pki"), clients=("cam-01", "cam-02", "cloud"))


@pytest.fixture
def link_factory():
    from mridc.lab.link import LinkEmulator

    links = []

    def _make(upstream_port: int, **options) -> LinkEmulator:
        link = LinkEmulator(("127.0.0.1", upstream_port), **options).start()
        links.append(link)
        return link

    yield _make
    for link in links:
        link.stop()


# -- minimal cloud receivers -------------------------------------------------------------------------
# mridc.cloud.service.receiver: a real subscriber / a real gRPC server that check, dedupe by (device,
# sequence) and ack. The production service is cloud/service/worker.py; these keep edge tests independent
# of it.


@pytest.fixture
def mqtt_cloud_factory():
    from mridc.cloud.service.receiver import MqttReceiver

    clouds = []

    def _make(port: int, **options) -> MqttReceiver:
        cloud = MqttReceiver(port, **options).start()
        clouds.append(cloud)
        return cloud

    yield _make
    for cloud in clouds:
        cloud.stop()


@pytest.fixture
def grpc_cloud_factory():
    from mridc.cloud.service.receiver import GrpcReceiver

    clouds = []

    def _make(port: int = 0, **options) -> GrpcReceiver:
        cloud = GrpcReceiver(port, **options).start()
        clouds.append(cloud)
        return cloud

    yield _make
    for cloud in clouds:
        cloud.stop()
