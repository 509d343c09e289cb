"""Dialogs, one module each; they return what the user entered and decide nothing."""
