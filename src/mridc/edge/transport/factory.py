"""`open_transport`: the transport for a URL. Kept apart from base.py so that the interface does not import
its implementations (they import it)."""

from __future__ import annotations

from urllib.parse import urlsplit

from mridc.edge.transport.base import TlsFiles, Transport, TransportError

SCHEMES = ("mqtt", "mqtts", "grpc", "grpcs", "coap")


def open_transport(
    url: str,
    device_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
    tls: TlsFiles | None = None,
    **options,
) -> Transport:
    """Build the transport for ``url`` (``mqtt[s]://HOST:PORT``, ``grpc[s]://HOST:PORT`` or ``coap://HOST:PORT``).

    ``options`` go to the implementation (``keepalive_s``, ``session_expiry_s``, ``deadline_s``,
    ``backoff``...). A ``...s://`` scheme turns TLS on with the system CA store unless ``tls``
    names a CA file.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise TransportError(f"transport URL {url!r}: scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if not parts.hostname:
        raise TransportError(f"transport URL {url!r} has no host (expected e.g. {scheme}://127.0.0.1:1883)")
    if scheme == "coap":
        if tls is not None and (tls.ca_file or tls.cert_file):
            raise TransportError("coap:// has no TLS here: datagrams are signed with the device token instead")
        from mridc.edge.transport.coap import CoapTransport

        allowed = ("retransmit", "deadline_s", "resend_window_s", "query_interval_s", "query_timeout_s",
                   "give_up_s", "mtu", "pace_s")
        return CoapTransport(parts.hostname, parts.port or 5683, device_id, token=token,
                             **{k: v for k, v in options.items() if k in allowed})
    secure = scheme.endswith("s")
    if secure and tls is None:
        tls = TlsFiles()
    if not secure and tls is not None and (tls.ca_file or tls.cert_file):
        raise TransportError(f"TLS files given but {url!r} is not a TLS URL: use {scheme}s://")
    if scheme.startswith("mqtt"):
        from mridc.edge.transport.mqtt import MqttTransport

        return MqttTransport(
            parts.hostname, parts.port or (8883 if secure else 1883), device_id,
            username=username or parts.username, password=password or parts.password, tls=tls, **options,
        )
    from mridc.edge.transport.grpc import GrpcTransport

    port = parts.port or (443 if secure else 50051)
    return GrpcTransport(f"{parts.hostname}:{port}", device_id, token=token, tls=tls, **options)
