"""JSON-RPC on the wire: newline framing and the request/response peer."""
