"""comfy_ws_proxy: an authenticated, durable WebSocket gateway in front of ComfyUI."""

__version__ = "0.1.0"
