"""Layer 4, the pipeline: one actor per module (the durable ingest log, enricher,
sessions, flusher, acker, publisher, replayer, backlog, dead letters, live hub, the session
worker link). An actor's inputs and outputs are the channels in its signature; actors
never import one another — what two of them share (``inflight``) has its own module."""
