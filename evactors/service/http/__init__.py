"""The HTTP surface: one module per group of routes (Segment API, live view, health and
metrics, admin), the request helpers they share, and the listener."""
