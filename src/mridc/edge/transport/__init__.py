"""Device-side transports: one small interface (`Transport`), one implementation per protocol.

`open_transport(url, device_id, ...)` picks the implementation from the URL scheme:
``mqtt://``, ``mqtts://`` (MQTT 5 over TLS), ``grpc://`` and ``grpcs://`` (gRPC over TLS).
"""

from mridc.edge.transport.base import AckCallback, Backoff, TlsFiles, Transport, TransportError
from mridc.edge.transport.factory import SCHEMES, open_transport

__all__ = ["SCHEMES", "AckCallback", "Backoff", "TlsFiles", "Transport", "TransportError", "open_transport"]
