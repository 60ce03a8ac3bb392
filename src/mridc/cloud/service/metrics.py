"""Prometheus metrics for one worker process (its own registry, served on --metrics HOST:PORT)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("mridc_frames_received", "Frames received", ["transport"], registry=r)
        self.frames_stored = Counter("mridc_frames_stored", "Frames decoded and stored", ["transport"],
                                     registry=r)
        self.frames_rejected = Counter("mridc_frames_rejected", "Frames rejected, by reason", ["reason"],
                                       registry=r)
        self.frames_duplicate = Counter("mridc_frames_duplicate", "Redelivered frames acked, not decoded",
                                        registry=r)
        self.decodes_discarded = Counter("mridc_decodes_discarded",
                                         "Decodes not stored: another worker stored the frame first", registry=r)
        self.frames_refined = Counter("mridc_frames_refined", "Previews replaced by their refined decode",
                                      registry=r)
        self.refines_failed = Counter("mridc_refines_failed", "Refinements abandoned (the preview stays)",
                                      registry=r)
        self.refine_backlog = Gauge("mridc_refine_backlog", "Stored previews not yet refined (0 = caught up)",
                                    registry=r)
        self.refine_seconds = Histogram("mridc_refine_seconds", "Refined decode time per frame",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.capture_to_refined_seconds = Histogram("mridc_capture_to_refined_seconds",
                                                    "Capture time to refined picture stored",
                                                    buckets=LATENCY_BUCKETS + (120, 300, 600), registry=r)
        self.datagrams = Counter("mridc_datagrams", "CoAP datagrams, by kind (slice, query) and result "
                                 "(accepted, duplicate, or the rejection reason)", ["kind", "result"], registry=r)
        self.frames_partial = Counter("mridc_frames_partial", "CoAP frames decoded at their deadline with slices "
                                      "missing", registry=r)
        self.frames_updated = Counter("mridc_frames_updated", "Stored frames decoded again with late slices "
                                      "(a new version)", registry=r)
        self.gathering_frames = Gauge("mridc_coap_gathering_frames", "CoAP frames whose slices are held in memory",
                                      registry=r)
        self.frames_need_intra = Counter("mridc_frames_need_intra", "Inter frames answered NEED_INTRA (reference "
                                         "not held)", registry=r)
        self.frames_busy = Counter("mridc_frames_busy", "Frames another live worker is decoding", registry=r)
        self.rate_limited = Counter("mridc_frames_rate_limited", "Frames refused by the per-device limit",
                                    registry=r)
        self.device_bytes = Counter("mridc_device_bytes", "Bitstream bytes received per device", ["device"],
                                    registry=r)
        self.queue_depth = Gauge("mridc_decode_queue_depth", "Frames waiting for the decoder", registry=r)
        self.decode_seconds = Histogram("mridc_decode_seconds", "Decoder time per batch", buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.batch_size = Histogram("mridc_decode_batch_size", "Frames per decode batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_seconds = Histogram("mridc_queue_wait_seconds", "Time from receive to decode start",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.calibration_frames = Counter("mridc_calibration_frames", "Calibration stills, by result (stored, "
                                          "duplicate, or the rejection reason)", ["result"], registry=r)
        self.adaptations = Counter("mridc_adaptations", "Scene adaptation runs, by result (accepted, rejected: "
                                   "not better on the held-out still, failed)", ["result"], registry=r)
        self.adapter_info = Gauge("mridc_device_adapter", "1 for the decoder version each device is decoded with "
                                  "(version 'base': not adapted)", ["device", "version"], registry=r)
        self.adaptation_running = Gauge("mridc_adaptation_running", "Scene adaptation runs in progress",
                                        registry=r)
        self.end_to_end_seconds = Histogram("mridc_capture_to_stored_seconds", "Capture time to stored",
                                            buckets=LATENCY_BUCKETS + (120, 300, 600), registry=r)

    def serve(self, addr: str) -> int:
        """Start the /metrics HTTP endpoint on HOST:PORT; returns the bound port."""
        host, _, port = addr.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._http_server = server
        return server.server_address[1]

    def close(self) -> None:
        server = getattr(self, "_http_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
