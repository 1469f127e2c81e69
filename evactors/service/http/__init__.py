"""The HTTP surface: one module per group of routes (Segment API, live view, health and
metrics, admin), the request helpers they share, our HTTP/1.1 connections and the
listener (HTTP/2 cleartext, opt-in, through hypercorn: ``h2c``)."""
