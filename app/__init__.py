"""Peregrine's desktop app: Qt views over plain-Python services."""
