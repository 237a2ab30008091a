"""Pure ASGI middleware, one module per concern; ``stack.install_toolkit`` stacks them safely."""
