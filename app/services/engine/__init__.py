"""The local engine seen from the app: its HTTP client and how it is launched and loaded."""
