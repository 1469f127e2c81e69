"""Layer 1, operations: metrics, structured logs, systemd notification, the allocator
setting. Imported by every layer above for counting and logging; imports only ``core``."""
