"""The Settings view and the controller that owns the app's settings."""
