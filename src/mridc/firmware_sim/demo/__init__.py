"""``make demo``: the whole system on one machine, end to end, with real pieces only.

    python -m mridc.firmware_sim.demo --out demo-out

1. a mosquitto broker on a free 127.0.0.1 port (no root; without mosquitto: gRPC, and it says so);
2. the cloud service, ``mridc-cloud serve``, as a subprocess with the shipped decoder;
3. one emulated low-bandwidth link per camera (``LinkEmulator``, default profile NB-IoT) in front of
   the broker or the gRPC server;
4. two or three simulated cameras: real ``EdgeAgent``s (durable SQLite queue, MQTT/gRPC transport,
   the real ``EdgeEncoder``) in this process, fed from the sample images and the sample clip in
   ``firmware_sim/demo_assets/``;
5. it waits until the cloud has acknowledged every accepted frame as stored, then compares each
   reconstruction with the frame the camera captured, and with the best AVIF that fits the same number
   of bytes (``mridc.lab.codecs``), and writes ``--out``:

   - ``report.json``, ``report.md``, ``index.html``: per frame device, sequence, bytes, bpp,
     capture-to-stored time, PSNR / MS-SSIM / perceptual distance for MRIDC and for AVIF;
   - ``side_by_side/``: original | MRIDC | AVIF at the same bytes, one PNG per frame;
   - ``cloud/``: the cloud service's store (``frames/<device>/*.png`` reconstructions + JSON sidecars);
   - ``originals/``, ``bitstreams/`` (the MRD bytes each camera sent), ``avif/`` (payload + decoded);
   - ``logs/``: broker, cloud service, edge agents and link events.

Every process it starts is stopped by its own PID (process group) at the end, on error and on Ctrl-C.
A missing piece (model files, mosquitto and gRPC, AVIF in Pillow, perceptual weights) is named and
the demo exits with status 2; nothing is ever made up. Exit status: 0 all frames delivered, decoded
and measured; 1 a frame was lost, rejected or timed out, or a process died; 2 a missing piece or a
bad option; 130 interrupted.
"""
