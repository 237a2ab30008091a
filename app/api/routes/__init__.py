"""The demo service's routes, one module per capability.

Each module exports ``router`` (an ``APIRouter``), ``setup(app)`` (adds the
capability's middleware or state to the app; may do nothing) and
``lifespan`` (an async context manager factory taking the app, or ``None``).
``app.main.create_app`` wires them in the order of ``CAPABILITIES``.
"""
