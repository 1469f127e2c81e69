"""Layer 2, storage: the Redis clients (redis-py in threads, a trio-native RESP client),
every Redis key and Lua script, the dedup window, the live keys, the embedded Valkey, the
data dir's paths, the ClickHouse client with its schema and migrations. No actor lives
here: these are the tools actors use."""
