"""The tests drive the real server through the project's launcher (`server.launcher`)."""

from server.launcher import ServerProcess, free_port

ADMIN_TOKEN = "test-admin-token-0123456789"

__all__ = ["ADMIN_TOKEN", "ServerProcess", "free_port"]
