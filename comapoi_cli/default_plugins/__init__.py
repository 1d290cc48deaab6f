"""Plugins that ship with comapoi; loaded through the same hooks as third-party plugins."""
