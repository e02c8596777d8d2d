"""The warm-pool daemon (server.py) and its local protocol (protocol.py)."""
