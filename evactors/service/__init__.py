"""Layer 5, the service: start-up, supervision, the topology (every channel and actor
spawn, in one place), signals and drain, the HTTP routes, the session worker process."""
