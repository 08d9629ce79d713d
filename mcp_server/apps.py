from django.apps import AppConfig


class McpServerConfig(AppConfig):
    """/mcp: the panel's services as Model Context Protocol tools (streamable HTTP)."""

    name = "mcp_server"
