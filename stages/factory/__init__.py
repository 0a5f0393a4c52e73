"""Factory-line integration: what a line operator needs on top of per-frame detections.

``results.merge`` -> ``track.items`` (ByteTrack ids, class by vote, fragment stitching) -> ``count.items`` (each
item counted once when it crosses the inspection station's centre line) -> ``events.items`` (item lifecycle and
line events, rules from the graph YAML) -> sinks: ``sink.mqtt`` (paho-mqtt, QoS 1, retained status, last will,
bounded buffer across broker outages), ``sink.metrics`` (Prometheus ``/metrics``) and the built-in sinks.

Modules, one concept each: ``tracking``, ``counting``, ``events``, ``mqtt_sink``, ``metrics``, ``truth`` (exact
per-item ground truth of a generated conveyor line, to measure counting error). Stage modules import their
third-party packages (ultralytics, paho-mqtt, prometheus-client) only when a stage is built or opened, so the
stage registry loads without them.
"""
