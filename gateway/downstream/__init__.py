"""The faces agents reach: stdio and streamable HTTP, and running them."""
