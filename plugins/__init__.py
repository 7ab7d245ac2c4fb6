"""Built-in plugins, one module each. They register through the ``plait`` entry-point
group like any third-party plugin, and never import one another."""
