"""Layer 0, no I/O: the event model, the Segment wire format, the messages actors pass,
the buffer codec, the settings, shard placement, taking and gathering what is queued on a
channel, and exit codes. Everything above depends on it; it depends on nothing of the
project."""
