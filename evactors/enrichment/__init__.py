"""Layer 3, enrichment: pure CPU work on one event — user agents, bots, GeoIP, page and
UTM fields, PII removal. No Redis, no ClickHouse, no channels."""
