"""Factory-line integration: what a line operator needs on top of per-frame detections.

``results.merge`` -> ``track.items`` (ByteTrack ids, class by vote, fragment stitching) -> ``count.items`` (each
item counted once when it crosses the inspection station's centre line) -> ``events.items`` (item lifecycle and
line events, rules from the graph YAML) -> sinks: ``sink.mqtt`` (paho-mqtt, QoS 1, retained status, last will,
bounded buffer across broker outages), ``sink.metrics`` (Prometheus ``/metrics``), ``sink.opcua`` (an OPC UA
server with counts, last item, line state and health as tags, asyncua), ``sink.view`` (the annotated stream as
MJPEG and a live page in the browser, standard-library HTTP) and the built-in sinks.

Modules, one concept each: ``tracking``, ``counting``, ``events``, ``mqtt_sink``, ``metrics``, ``opcua_sink``,
``webview``, ``linestate`` (the line's current state that the OPC UA server and the view show), ``truth`` (exact
per-item ground truth of a generated conveyor line, to measure counting error). Stage modules import their
third-party packages (ultralytics, paho-mqtt, prometheus-client, asyncua) only when a stage is built or opened,
so the stage registry loads without them.
"""
